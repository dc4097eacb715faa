"""Byte ranges of a plain JSONL file: cuts land on line starts, and every line is read exactly once."""

from __future__ import annotations

import gzip
import json

import pytest

from data.preprocess.document import Document, Malformed
from data.preprocess.jsonl import iter_lines, read_documents
from data.preprocess.ranges import WHOLE_FILE, cut_points, next_line_start, split_files

ZH = "中文的句子，汉字占三个字节。"
MALFORMED = b'{"text": "not closed, \xe4\xb8\xad'  # invalid JSON with a complete 3-byte character
INVALID_UTF8 = b'{"text": "half a character \xe4\xb8"}'


def corpus_bytes() -> bytes:
    """Good lines (zh and en), a blank line, a malformed line, invalid UTF-8, a truncated last line."""
    lines = [
        json.dumps({"text": f"{ZH} {i}" if i % 2 else f"english line {i}"}, ensure_ascii=False)
        for i in range(30)
    ]
    raw = [line.encode() for line in lines]
    raw[7:7] = [b"", MALFORMED]
    raw[15:15] = [INVALID_UTF8]
    return b"\n".join(raw) + b'\n{"text": "the file ends inside this li'


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(corpus_bytes())
    return path


def read_by_ranges(path, size_bytes):
    spans = split_files([path], size_bytes, workers=1, desc="test")[0]
    return spans, [item for span in spans for item in read_documents(path, span=span)]


def describe(item):
    doc, nbytes = item
    if isinstance(doc, Document):
        return ("doc", doc.id, doc.text, doc.line, nbytes)
    return ("malformed", doc.reason, doc.line, doc.raw, nbytes)


def test_every_range_size_reads_every_line_once_with_its_file_line_number(corpus):
    whole = [describe(item) for item in read_documents(corpus)]
    whole_lines = list(iter_lines(corpus))
    assert {w[1] for w in whole if w[0] == "malformed"} == {"invalid_json", "invalid_utf8"}
    for size in range(1, corpus.stat().st_size + 2):
        spans, items = read_by_ranges(corpus, size)
        assert [describe(item) for item in items] == whole, size
        assert [line for span in spans for line in iter_lines(corpus, span)] == whole_lines, size
    assert len(read_by_ranges(corpus, 1)[0]) == len(whole_lines)  # one range per line at the smallest


def test_cuts_are_line_starts_and_spans_tile_the_file(corpus):
    data = corpus.read_bytes()
    for size in (1, 7, 64, 100, 333, 1000):
        spans = split_files([corpus], size, workers=1, desc="test")[0]
        assert spans[0].start == 0 and spans[-1].end is None
        for left, right in zip(spans, spans[1:], strict=False):
            assert left.end == right.start and data[right.start - 1 : right.start] == b"\n"
            assert right.first_line == left.end_line == data[: right.start].count(b"\n") + 1


def test_a_cut_exactly_on_a_line_start_stays_there(corpus):
    data = corpus.read_bytes()
    line_start = data.index(b"\n", 200) + 1
    assert next_line_start(corpus, line_start) == line_start
    assert cut_points(corpus, line_start)[1] == line_start


def test_a_cut_on_the_newline_byte_moves_past_it(corpus):
    data = corpus.read_bytes()
    newline = data.index(b"\n", 200)
    assert cut_points(corpus, newline)[1] == newline + 1


def test_a_cut_inside_a_multibyte_character_moves_to_the_next_line(corpus):
    data = corpus.read_bytes()
    inside = data.index(ZH.encode()) + 1  # the second byte of the first Han character
    _, items = read_by_ranges(corpus, inside)
    assert cut_points(corpus, inside)[1] == data.index(b"\n", inside) + 1
    assert [describe(i) for i in items] == [describe(i) for i in read_documents(corpus)]


@pytest.mark.parametrize("bad", [MALFORMED, INVALID_UTF8])
def test_a_cut_inside_a_malformed_line_reports_it_once(corpus, bad):
    data = corpus.read_bytes()
    inside = data.index(bad) + len(bad) // 2
    _, items = read_by_ranges(corpus, inside)
    malformed = [doc for doc, _ in items if isinstance(doc, Malformed)]
    expected_line = data[: data.index(bad)].count(b"\n") + 1
    assert sum(m.line == expected_line for m in malformed) == 1
    assert len(malformed) == 3  # the two bad lines and the truncated last one, each once


def test_a_line_longer_than_a_range_is_one_range(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_bytes(
        b'{"text": "short"}\n' + json.dumps({"text": "x" * 5000}).encode() + b'\n{"text": "end"}\n'
    )
    spans, items = read_by_ranges(path, 100)
    assert [s.first_line for s in spans] == [1, 3]  # the cut at byte 100 falls inside line 2
    assert [doc.text[:5] for doc, _ in items] == ["short", "xxxxx", "end"]


def test_small_and_compressed_files_stay_one_task(tmp_path, corpus):
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    plain, compressed = split_files([corpus, packed], 64, workers=1, desc="test")
    assert len(plain) > 1 and compressed == [WHOLE_FILE]
    assert split_files([corpus], corpus.stat().st_size, workers=1, desc="test") == [[WHOLE_FILE]]
    assert split_files([corpus], 0, workers=1, desc="test") == [[WHOLE_FILE]]  # range_mb 0: no splitting


def test_reading_a_compressed_file_from_the_middle_is_refused(tmp_path, corpus):
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    span = split_files([corpus], 64, workers=1, desc="test")[0][1]
    with pytest.raises(ValueError, match="compressed"):
        list(iter_lines(packed, span))
