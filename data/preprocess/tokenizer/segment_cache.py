"""An exact cache of SentencePiece encodings per text segment: a repeated word costs a dict lookup.

Text is cut before every run of spaces that follows a non-space character; a model trained with
`split_by_whitespace` (and whitespace kept as a prefix) has no vocabulary piece that crosses such a
point. BPE never merges across a point that no piece crosses, so encoding the segments between the
points separately gives the same ids as encoding the whole text. Because the cut rule depends only
on the two characters around a cut, one check makes it safe for any model: every vocabulary piece
must come out of the cutter whole (:func:`exactness`, at load time; else there is no cache).

The rest of SentencePiece must be local too, which :func:`exactness` also checks: a BPE model
(merges, not a search over the whole text); identity normalization (the only change is " " -> "▁");
byte fallback (without it a run of unknown characters becomes one <unk>, across any cut); and no
UNUSED pieces (SentencePiece undoes a merge into one with the last split it saw anywhere in the
text). Text containing a domain token that the cutter would split is encoded whole. Segments seen
for the first time go to SentencePiece by their ASCII pieces where the model allows (`ascii_pieces.py`).

Texts with almost no spaces (a Chinese paragraph is one long segment) are encoded whole too: there
is nothing to reuse. (Cutting Chinese at punctuation would be exact, but does not pay: on the bench
corpus 78% of its clauses' bytes are new, SentencePiece encodes the clauses of a batch only 1.17x
slower per byte than the whole texts, and cutting, looking up and joining ~300K clauses per 7.8 MB
in Python costs what the cache would save.) Entries are the packed ids (bytes in the dataset's dtype),
so a document is one `bytes.join` of its segments' entries. Segments longer than MAX_SEGMENT are
encoded but not kept, and the tables start over from empty past MAX_ENTRIES, so memory stays
bounded (about 110 bytes an entry on the benchmark corpus, so some 0.1 GB per worker when full).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .ascii_pieces import AsciiPieces, ascii_cuts_hold
from .hf import NORMAL, UNUSED, USER_DEFINED

# "▁" is a space to SentencePiece. A segment: optional spaces, then non-spaces; or spaces alone.
SEGMENT = re.compile(r"[ \u2581]*[^ \u2581]+|[ \u2581]+")
MAX_SEGMENT = 64  # longer segments are encoded every time, not kept (deep indentation still fits)
MAX_ENTRIES = 1 << 20  # then the cache starts again from empty
SPARSE_SPACES = 50  # fewer than one space per 50 characters: encode whole
_BPE = 2  # TrainerSpec.ModelType.BPE


def comes_whole(piece: str) -> bool:
    """True if the cutter leaves `piece` in one `SEGMENT` (`SEGMENT.findall` finds exactly one): it is
    spaces alone, or spaces then no space at all (a string test, ~2.5x cheaper than the regex; a
    test checks that they agree on every piece of a trained model and on crafted ones)."""
    text = piece.replace("\u2581", " ")
    return bool(text) and " " not in text.lstrip(" ")


@dataclass(frozen=True)
class Exactness:
    """What makes the cache exact for a model: its domain tokens (USER_DEFINED pieces, which
    SentencePiece matches whole), and whether first-seen segments may be cut at ASCII letter/other
    points too (`ascii_pieces.py`)."""

    domain_tokens: list[str]
    ascii_cuts: bool


def exactness(proto) -> Exactness | None:
    """How encoding `SEGMENT`s one by one gives SentencePiece's ids for the whole text; None if it
    cannot. One pass over the pieces: this runs in every worker at start-up."""
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != _BPE or not trainer.byte_fallback:
        return None
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return None
    if not spec.escape_whitespaces:  # " " and "▁" would be different characters
        return None
    if trainer.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap:
        return None
    domain, normal = [], []
    for piece in proto.pieces:
        kind, text = piece.type, piece.piece
        if kind == NORMAL:
            if not comes_whole(text):
                return None
            normal.append(text)
        elif kind == USER_DEFINED:
            domain.append(text)
        elif kind == UNUSED:
            return None
    return Exactness(domain, ascii_cuts_hold(normal))


Table = dict[str, bytes]  # key -> packed ids (plain dicts: `set.difference` is fast only on those)
Keys = tuple[list[str], list[str]]  # a text's keys in `segments`, then in `words`


def cut(text: str) -> Keys:
    """The keys to look `text` up by, in order: keys in `segments`, then keys in `words`. Text is cut
    into its `SEGMENT`s, except single-spaced text without "▁" (most prose), cut by `str.split`, much
    faster than the regex: its segments are its first word (if any), then " " + each following word,
    kept in `words` by the word alone. Both cuts give the same segments, so the same ids (a test
    checks it)."""
    if "  " in text or "\u2581" in text:
        return SEGMENT.findall(text), []
    head, *rest = text.split(" ")
    return [head] if head else [], rest


def _split_tokens(domain_tokens: Sequence[str]) -> re.Pattern | None:
    """A pattern for the domain tokens that the cutter would split, however their spaces are written
    (SentencePiece matches them after turning " " into "▁", so "a b" and "a▁b" are the same token)."""
    split = [t for t in domain_tokens if not comes_whole(t)]
    spellings = ["[ \u2581]".join(map(re.escape, re.split("[ \u2581]", t))) for t in split]
    return re.compile("|".join(spellings)) if spellings else None


class SegmentCache:
    """`encode_packed` (texts to packed ids, one SentencePiece call) made fast on repeated segments."""

    def __init__(
        self,
        encode_packed: Callable[[list[str]], list[bytes]],
        domain_tokens: Sequence[str] = (),
        ascii_cuts: bool = False,
    ):
        self._encode_packed = encode_packed
        self.segments: Table = {}  # SEGMENT -> its ids
        self.words: Table = {}  # word -> the ids of " " + word
        self._tables = ((self.segments, ""), (self.words, " "))
        self._needs_whole = _split_tokens(domain_tokens)
        # First-seen segments: by their ASCII pieces where the model allows it, else whole.
        self.pieces = AsciiPieces(encode_packed, domain_tokens) if ascii_cuts else None
        self._encode_new = self.pieces.encode_new if self.pieces is not None else encode_packed

    def __len__(self) -> int:
        return len(self.segments) + len(self.words) + (len(self.pieces) if self.pieces is not None else 0)

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]:
        out = [b""] * len(texts)
        whole: list[int] = []
        missed: list[tuple[int, Keys]] = []
        # Bound lookups mapped over the keys: no Python bytecode per segment (the tables are only
        # ever cleared, never replaced, so the bound methods stay valid).
        segment, word = self.segments.__getitem__, self.words.__getitem__
        for i, text in enumerate(texts):
            if self._whole(text):
                whole.append(i)
                continue
            keys = cut(text)
            try:
                out[i] = b"".join([*map(segment, keys[0]), *map(word, keys[1])])
            except KeyError:
                missed.append((i, keys))
        if missed:
            self._fill(missed, out)
        if whole:
            for i, packed in zip(whole, self._encode_packed([texts[i] for i in whole]), strict=True):
                out[i] = packed
        return out

    def _fill(self, missed: list[tuple[int, Keys]], out: list[bytes]) -> None:
        """Encode the keys not in the tables (one SentencePiece call per table), join those texts."""
        added = []
        for side, (table, prefix) in enumerate(self._tables):
            pending: set[str] = set()
            for _, keys in missed:
                pending.update(keys[side])
            new = list(pending.difference(table))
            if new:
                table.update(zip(new, self._encode_new([prefix + k for k in new]), strict=True))
                added.append((table, new))
        segment, word = self.segments.__getitem__, self.words.__getitem__
        for i, (segment_keys, word_keys) in missed:
            out[i] = b"".join([*map(segment, segment_keys), *map(word, word_keys)])
        for table, new in added:
            for key in new:
                if len(key) > MAX_SEGMENT:
                    del table[key]
        if len(self) > MAX_ENTRIES:
            self.segments.clear()
            self.words.clear()
            if self.pieces is not None:
                self.pieces.clear()

    def _whole(self, text: str) -> bool:
        """Encode without the cache: text with a domain token the cutter splits, or almost no spaces."""
        if self._needs_whole is not None and self._needs_whole.search(text):
            return True
        return text.count(" ") * SPARSE_SPACES < len(text)
