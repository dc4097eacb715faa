"""First-seen segments encoded by their ASCII pieces: SentencePiece sees only the pieces it has not seen.

A segment the cache has not seen yet (`segment_cache.py`) must go through SentencePiece, whose cost is
per character: on code, where most first-seen segments are like " self.assertEqual(result," (only ever
seen once), that is half the time. But such a segment has more exact cut points: between an ASCII
letter and any other ASCII character but the space, either way round (" self", ".", "assertEqual",
"(", "result", ","). A model trained with SentencePiece's defaults has no piece across them (letters
are Latin script, the rest Common, and `split_by_unicode_script` keeps scripts apart; digits are
Common too under `split_by_number`), and :func:`ascii_cuts_hold` checks that on the pieces at load
time, as the segment cut is checked. The same BPE argument as the segment cut's then makes the pieces'
ids, joined, the segment's ids; and the pieces repeat far more than the segments do, so SentencePiece
encodes a quarter of the characters (bench corpus, code: 0.87 -> 0.23 MB in 20 MB).

Only ASCII segments that start with a space are cut so: then all of a batch's new segments are cut in
one regex pass over their concatenation, whose matches cannot cross from one segment to the next (a
match is spaces, then letters or other characters, never a space after them). A domain token that the
cut would split (say "<tool_call>") is matched by SentencePiece as one piece wherever it occurs, so a
batch whose new segments hold one is encoded whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import compress, pairwise
from operator import not_

import numpy as np

_LETTER = "A-Za-z"
_OTHER = "\\x00-\\x1f!-@\\[-`{-\\x7f"  # ASCII but letters and the space
ASCII_PIECE = re.compile(rf"[ ]*(?:[{_LETTER}]+|[{_OTHER}]+)")  # on ASCII text without inner spaces
ACROSS_ASCII_CUT = re.compile(rf"[{_LETTER}][{_OTHER}]|[{_OTHER}][{_LETTER}]")
MAX_PIECE = 64  # longer pieces are encoded but not kept, as for segments


def ascii_cuts_hold(pieces: Sequence[str]) -> bool:
    """True if no piece has an ASCII letter beside another ASCII character but the space (one regex
    pass: the space that joins the pieces is in neither class, so no match spans two of them)."""
    return ACROSS_ASCII_CUT.search(" ".join(pieces)) is None


class AsciiPieces:
    """`encode_new(texts)`: SentencePiece's ids of first-seen segments, from a table of ASCII pieces."""

    def __init__(self, encode_packed: Callable[[list[str]], list[bytes]], domain_tokens: Sequence[str] = ()):
        self._encode_packed = encode_packed
        self.table: dict[str, bytes] = {}
        split = [re.escape(t) for t in domain_tokens if ACROSS_ASCII_CUT.search(t)]
        self._split_tokens = re.compile("|".join(split)) if split else None

    def __len__(self) -> int:
        return len(self.table)

    def clear(self) -> None:
        self.table.clear()

    def encode_new(self, texts: list[str]) -> list[bytes]:
        cut = [t.isascii() and t[:1] == " " and not t.isspace() for t in texts]
        picked = list(compress(texts, cut))
        by_pieces = self._by_pieces(picked) if picked else None
        if by_pieces is None:
            return self._encode_packed(texts)
        rest = iter(self._encode_packed(list(compress(texts, map(not_, cut)))))
        pieced = iter(by_pieces)
        return [next(pieced) if c else next(rest) for c in cut]

    def _by_pieces(self, segments: list[str]) -> list[bytes] | None:
        """Each segment's ids joined from its pieces' (None: a domain token would be split)."""
        joined = "".join(segments)
        if self._split_tokens is not None and self._split_tokens.search(joined):
            return None
        pieces = ASCII_PIECE.findall(joined)
        piece_ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))
        segment_ends = np.cumsum(np.fromiter(map(len, segments), np.int64, len(segments)))
        counts = np.searchsorted(piece_ends, segment_ends, side="right")  # pieces up to each segment's end
        if piece_ends.size == 0 or not np.array_equal(piece_ends[counts - 1], segment_ends):
            return None  # pieces not aligned with the segments: cannot happen (see above), stays exact
        new = list(set(pieces).difference(self.table))
        if new:
            self.table.update(zip(new, self._encode_packed(new), strict=True))
        # All pieces' ids in one join, cut at each segment's last piece: no join per segment.
        ids = list(map(self.table.__getitem__, pieces))
        blob = b"".join(ids)
        byte_ends = np.cumsum(np.fromiter(map(len, ids), np.int64, len(ids)))[counts - 1].tolist()
        joined_ids = [blob[a:b] for a, b in pairwise([0, *byte_ends])]
        for piece in new:
            if len(piece) > MAX_PIECE:
                del self.table[piece]
        return joined_ids
