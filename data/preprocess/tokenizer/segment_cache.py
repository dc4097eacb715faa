"""An exact cache of SentencePiece encodings per text segment: a repeated word costs a dict lookup.

Text is cut before every run of spaces that follows a non-space character; a model trained with
`split_by_whitespace` (and whitespace kept as a prefix) has no vocabulary piece that crosses such a
point. BPE never merges across a point that no piece crosses, so encoding the segments between the
points separately gives the same ids as encoding the whole text. Because the cut rule depends only
on the two characters around a cut, one check makes it safe for any model: every vocabulary piece
must come out of the cutter whole (:func:`is_exact`, at load time; else there is no cache).

The rest of SentencePiece must be local too, which :func:`is_exact` also checks: a BPE model
(merges, not a search over the whole text); identity normalization (the only change is " " -> "▁");
byte fallback (without it a run of unknown characters becomes one <unk>, across any cut); and no
UNUSED pieces (SentencePiece undoes a merge into one with the last split it saw anywhere in the
text). Text containing a domain token that the cutter would split is encoded whole.

Texts with almost no spaces (a Chinese paragraph is one long segment) are encoded whole too: there
is nothing to reuse. (Cutting Chinese at punctuation would be exact, but does not pay: on the bench
corpus its ~14-byte clauses cost SentencePiece 6x more per byte than whole texts, a per-call cost,
and 78% of their bytes are new anyway.) Entries are the packed ids (bytes in the dataset's dtype),
so a document is one `bytes.join` of its segments' entries. Segments longer than MAX_SEGMENT are
encoded but not kept, and the tables start over from empty past MAX_ENTRIES, so memory stays
bounded (about 110 bytes an entry on the benchmark corpus, so some 0.1 GB per worker when full).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .hf import NORMAL, UNUSED

# "▁" is a space to SentencePiece. A segment: optional spaces, then non-spaces; or spaces alone.
SEGMENT = re.compile(r"[ \u2581]*[^ \u2581]+|[ \u2581]+")
MAX_SEGMENT = 64  # longer segments are encoded every time, not kept (deep indentation still fits)
MAX_ENTRIES = 1 << 20  # then the cache starts again from empty
SPARSE_SPACES = 50  # fewer than one space per 50 characters: encode whole
_BPE = 2  # TrainerSpec.ModelType.BPE


def is_exact(proto) -> bool:
    """True if encoding `SEGMENT`s one by one gives SentencePiece's ids for the whole text."""
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != _BPE or not trainer.byte_fallback:
        return False
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return False
    if not spec.escape_whitespaces:  # " " and "▁" would be different characters
        return False
    if trainer.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap:
        return False
    for piece in proto.pieces:
        if piece.type == UNUSED:
            return False
        if piece.type == NORMAL and len(SEGMENT.findall(piece.piece.replace("\u2581", " "))) != 1:
            return False
    return True


Table = dict[str, bytes]  # key -> packed ids (plain dicts: `set.difference` is fast only on those)
Groups = list[tuple[Table, list[str]]]


def cut(text: str, segments: Table, words: Table) -> Groups:
    """The keys to look `text` up by, in order: its `SEGMENT`s in `segments`. Single-spaced text
    without "▁" (most prose) is cut by `str.split`, which is much faster than the regex: its
    segments are its first word (if any), then " " + each following word, kept in `words` by the
    word alone. Both cuts give the same segments, so the same ids (a test checks it)."""
    if "  " in text or "\u2581" in text:
        return [(segments, SEGMENT.findall(text))]
    head, *rest = text.split(" ")
    return [(segments, [head] if head else []), (words, rest)]


def _split_tokens(domain_tokens: Sequence[str]) -> re.Pattern | None:
    """A pattern for the domain tokens that the cutter would split, however their spaces are written
    (SentencePiece matches them after turning " " into "▁", so "a b" and "a▁b" are the same token)."""
    split = [t for t in domain_tokens if len(SEGMENT.findall(t.replace("\u2581", " "))) != 1]
    spellings = ["[ \u2581]".join(map(re.escape, re.split("[ \u2581]", t))) for t in split]
    return re.compile("|".join(spellings)) if spellings else None


class SegmentCache:
    """`encode_packed` (texts to packed ids, one SentencePiece call) made fast on repeated segments."""

    def __init__(self, encode_packed: Callable[[list[str]], list[bytes]], domain_tokens: Sequence[str] = ()):
        self._encode_packed = encode_packed
        self.segments: Table = {}  # SEGMENT -> its ids
        self.words: Table = {}  # word -> the ids of " " + word
        self._tables = ((self.segments, ""), (self.words, " "))
        self._needs_whole = _split_tokens(domain_tokens)

    def __len__(self) -> int:
        return len(self.segments) + len(self.words)

    def encode_packed(self, texts: Sequence[str]) -> list[bytes]:
        out = [b""] * len(texts)
        whole: list[int] = []
        missed: list[tuple[int, Groups]] = []
        for i, text in enumerate(texts):
            if self._whole(text):
                whole.append(i)
                continue
            groups = cut(text, self.segments, self.words)
            try:
                out[i] = b"".join([table[key] for table, keys in groups for key in keys])
            except KeyError:
                missed.append((i, groups))
        if missed:
            self._fill(missed, out)
        if whole:
            for i, packed in zip(whole, self._encode_packed([texts[i] for i in whole]), strict=True):
                out[i] = packed
        return out

    def _fill(self, missed: list[tuple[int, Groups]], out: list[bytes]) -> None:
        """Encode the keys not in the tables (one SentencePiece call per table), join those texts."""
        added = []
        for table, prefix in self._tables:
            pending: set[str] = set()
            for _, groups in missed:
                for group_table, keys in groups:
                    if group_table is table:
                        pending.update(keys)
            new = list(pending.difference(table))
            if new:
                table.update(zip(new, self._encode_packed([prefix + k for k in new]), strict=True))
                added.append((table, new))
        for i, groups in missed:
            out[i] = b"".join([table[key] for table, keys in groups for key in keys])
        for table, new in added:
            for key in new:
                if len(key) > MAX_SEGMENT:
                    del table[key]
        if len(self) > MAX_ENTRIES:
            self.segments.clear()
            self.words.clear()

    def _whole(self, text: str) -> bool:
        """Encode without the cache: text with a domain token the cutter splits, or almost no spaces."""
        if self._needs_whole is not None and self._needs_whole.search(text):
            return True
        return text.count(" ") * SPARSE_SPACES < len(text)
