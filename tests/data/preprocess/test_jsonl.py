"""Bad input is counted and set aside, never a crash and never a silent drop."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import zstandard

from data.demo import synth
from data.preprocess.document import Document, Malformed
from data.preprocess.jsonl import ShardWriter, expand_inputs, parse_line, parse_text_line, read_documents
from data.preprocess.stage import run_file_stage
from data.preprocess.steps import clean_file
from megatron_patches.errors import ConfigError

from .conftest import config_for

GOOD = [{"id": f"g{i}", "text": synth.en_doc(random.Random(i))} for i in range(5)]
BAD_LINES = [
    (b"this is not json\n", "invalid_json"),
    (b'{"id": "u", "text": "caf\xe9"}\n', "invalid_utf8"),
    (b'{"id": "m", "body": "no text field"}\n', "missing_text"),
    (b'{"id": "n", "text": 42}\n', "text_not_string"),
    (b"[1, 2]\n", "not_an_object"),
    (b'{"id": "s", "text": "lone \\ud800 surrogate"}\n', "invalid_utf8"),
]


def _lines(records):
    return [(json.dumps(r) + "\n").encode() for r in records]


def _mixed_file(path):
    lines = _lines(GOOD)
    for offset, (bad, _) in enumerate(BAD_LINES):
        lines.insert(1 + 2 * offset, bad)
    lines.insert(3, b"\n")  # a blank line is not a document and not an error
    path.write_bytes(b"".join(lines))
    return path


def test_reader_yields_every_line_as_document_or_malformed(tmp_path):
    items = [item for item, _ in read_documents(_mixed_file(tmp_path / "mixed.jsonl"))]
    docs = [i for i in items if isinstance(i, Document)]
    bad = [i for i in items if isinstance(i, Malformed)]
    assert [d.id for d in docs] == [r["id"] for r in GOOD]
    assert sorted(b.reason for b in bad) == sorted(reason for _, reason in BAD_LINES)
    assert all(b.line > 0 for b in bad)


ODD_BUT_VALID = [  # json reads these; orjson refuses or reads them otherwise, so parse_line decides
    b'{"id": "nan", "text": "x", "score": NaN}',
    b'{"id": 123456789012345678901234567890, "text": "a huge integer id"}',
    b'{"id": 1.5, "text": "a float id", "channel": 7}',
    b'{"id": 18446744073709551615, "text": "the largest 64-bit id", "channel": null}',
    b'{"text": "first", "text": "last wins", "channel": "zh_web"}',
    b'{"text": "escaped pair \\ud83d\\ude00 and \\u00e9"}',
    b'{"text": "big float", "f": 1e400}',
    b"  \t ",
    b"\xef\xbb\xbf" + b'{"text": "a byte order mark"}',
]


def test_fast_text_parser_reads_every_line_as_parse_line_does():
    """tokenize's orjson parser keeps text, id and channel exactly, and every reason for a bad line."""
    lines = [bad.rstrip(b"\n") for bad, _ in BAD_LINES] + [raw.rstrip(b"\n") for raw in _lines(GOOD)]
    for n, raw in enumerate(lines + ODD_BUT_VALID, start=1):
        slow, fast = parse_line(raw, "text", "in.jsonl", n), parse_text_line(raw, "text", "in.jsonl", n)
        assert type(fast) is type(slow), raw
        if isinstance(slow, Malformed):
            assert (fast.reason, fast.line, fast.raw) == (slow.reason, slow.line, slow.raw)
        elif slow is not None:
            assert (fast.text, fast.id, fast.channel, fast.line) == (slow.text, slow.id, slow.channel, n)


def test_truncated_gzip_keeps_what_was_readable_and_reports_the_cut(tmp_path):
    data = gzip.compress(b"".join(_lines(GOOD * 40)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    items = [item for item, _ in read_documents(path)]
    assert isinstance(items[-1], Malformed) and items[-1].reason == "truncated_input"
    good = items[:-1]
    assert good and all(isinstance(i, Document) for i in good)


@pytest.mark.parametrize("truncate", [False, True])
def test_zstd_input_in_two_frames(tmp_path, truncate):
    records = [{"id": i, "text": synth.en_doc(random.Random(i))} for i in range(400)]
    frames = [
        zstandard.ZstdCompressor().compress(b"".join(_lines(half))) for half in (records[:200], records[200:])
    ]
    data = b"".join(frames)
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(data[: len(data) * 3 // 4] if truncate else data)
    items = [item for item, _ in read_documents(path)]
    docs = [i for i in items if isinstance(i, Document)]
    if truncate:
        assert items[-1].reason == "truncated_input" and 200 <= len(docs) < 400
    else:
        assert [d.text for d in docs] == [r["text"] for r in records]


def test_clean_stage_counts_and_writes_every_malformed_line(tmp_path):
    _mixed_file(tmp_path / "mixed.jsonl")
    data = gzip.compress(b"".join(_lines(GOOD)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:-20])
    report = run_file_stage(
        "clean",
        config_for(tmp_path),
        expand_inputs([str(tmp_path / "*.jsonl*")]),
        tmp_path / "out",
        False,
        clean_file,
    )
    malformed = (tmp_path / "out" / "rejected" / "malformed.jsonl").read_text().splitlines()
    assert report["malformed_lines"] == len(malformed) == len(BAD_LINES) + 1
    assert report["malformed"]["truncated_input"] == 1
    kept = sum(len(p.read_text().splitlines()) for p in (tmp_path / "out").glob("part-*.jsonl"))
    rejected = sum(report.get("rejected", {}).values())
    assert report["docs_in"] == kept + rejected and kept >= len(GOOD)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_shard_writer_numbers_parts_and_leaves_no_temp_files(tmp_path):
    writer = ShardWriter(tmp_path, "part-00003", max_docs=2)
    for i in range(5):
        writer.write(json.dumps({"i": i}))
    parts = writer.close()
    assert [p.name for p in parts] == [f"part-00003-0000{k}.jsonl" for k in range(3)]
    assert [len(p.read_text().splitlines()) for p in parts] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in parts]  # no temporary left


def test_missing_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        expand_inputs([str(tmp_path / "nothing-*.jsonl")])


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_lines(GOOD)))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="--overwrite"):
        run_file_stage("clean", config_for(tmp_path), [path], tmp_path / "out", False, clean_file)
