"""Splitting a big plain file into ranges changes nothing a stage writes: parts, rejects, reports."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from data.demo import synth
from data.preprocess.dedup import run_dedup
from data.preprocess.pipeline import fingerprint
from data.preprocess.stage import file_tasks, run_file_stage
from data.preprocess.steps import clean_file
from data.preprocess.tokenize import run_tokenize

from .conftest import config_for
from .test_dedup import near_duplicate

TINY_RANGES = 0.002  # MB: 2 KB, so the ~27 KB test file has a dozen ranges
_TIMING = ("seconds", "docs_per_s", "mb_per_s")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    """zh/en prose, junk for clean, exact and near duplicates (some without an id, so that their id
    is `file:line`), a blank line, malformed lines and a truncated last line."""
    rng = random.Random(11)
    texts = [synth.zh_doc(rng, 6) if i % 2 else synth.en_doc(rng, 6) for i in range(40)]
    records = [{"id": f"o{i}", "text": t} for i, t in enumerate(texts)]
    records += [{"text": near_duplicate(rng, texts[i])} for i in range(8)]
    records += [{"text": texts[i]} for i in range(20, 26)]  # exact copies: same length, the first is kept
    records += [{"id": f"junk-{rule}", "text": text} for rule, text in synth.junk_docs(rng)]
    rng.shuffle(records)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    lines[10:10] = [b"", b'{"text": "not json', b'{"text": "bad \xe4\xb8 utf-8"}', b'{"no_text": 1}']
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b'\n{"text": "cut off in the mid')
    return path


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a stage's output (gzip parts decompressed: their header holds a timestamp), the
    report without its timings."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        data = path.read_bytes()
        if name == "report.json":
            report = json.loads(data)
            data = json.dumps({k: v for k, v in report.items() if k not in _TIMING}, sort_keys=True).encode()
        data = gzip.decompress(data) if name.endswith(".gz") else data
        files[name] = data.replace(str(out).encode(), b"<out>")  # blend.yaml names its directory
    return files


def assert_same_outputs(split: Path, whole: Path) -> None:
    a, b = snapshot(split), snapshot(whole)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


def test_the_test_file_is_split_into_many_ranges(big_file, tmp_path):
    tasks = file_tasks([big_file, big_file], tmp_path, config_for(tmp_path, range_mb=TINY_RANGES), "test")
    assert len(tasks) > 20 and [t.index for t in tasks] == sorted(t.index for t in tasks)


@pytest.mark.parametrize(("workers", "compress"), [(1, False), (2, True)])
def test_clean_outputs_do_not_depend_on_ranges(big_file, tmp_path, workers, compress):
    reports = {}
    for name, range_mb in (("split", TINY_RANGES), ("whole", 0)):
        config = config_for(
            tmp_path, range_mb=range_mb, workers=workers, shard_docs=7, compress_output=compress
        )
        reports[name] = run_file_stage("clean", config, [big_file], tmp_path / name, False, clean_file)
    assert_same_outputs(tmp_path / "split", tmp_path / "whole")
    report = reports["split"]
    assert report["malformed"] == {"invalid_json": 2, "invalid_utf8": 1, "missing_text": 1}  # last line: json
    assert (
        report["docs_out"] > 14 and sum(report["rejected"].values()) > 0
    )  # parts and rejects both exercised
    assert not (tmp_path / "split" / "_spool").exists()


def test_dedup_outputs_do_not_depend_on_ranges(big_file, tmp_path):
    for name, range_mb in (("split", TINY_RANGES), ("whole", 0)):
        run_dedup(config_for(tmp_path, range_mb=range_mb, shard_docs=9), [big_file], tmp_path / name)
    assert_same_outputs(tmp_path / "split", tmp_path / "whole")
    rejected = (tmp_path / "split" / "rejected").glob("dedup_*.jsonl")
    rules = [json.loads(line)["rule"] for p in rejected for line in p.read_text().splitlines()]
    assert rules.count("dedup_exact") >= 6 and rules.count("dedup_near") >= 6


def test_tokenize_outputs_do_not_depend_on_ranges(big_file, tmp_path, tokenizer_dir):
    for name, range_mb in (("split", TINY_RANGES), ("whole", 0)):
        run_tokenize(config_for(tmp_path, range_mb=range_mb), [big_file], tmp_path / name, tokenizer_dir)
    assert_same_outputs(tmp_path / "split", tmp_path / "whole")
    assert (tmp_path / "split" / "unlabelled_text_document.bin").stat().st_size > 0


def test_the_range_size_is_not_part_of_the_resume_fingerprint(big_file, tmp_path):
    marks = {fingerprint(config_for(tmp_path, range_mb=mb), "clean", [big_file], []) for mb in (0, 1, 128)}
    assert len(marks) == 1
