"""Dedup: the hashing is sound, planted near duplicates are found, distinct documents survive."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from data.demo import synth
from data.preprocess.dedup import run_dedup
from data.preprocess.dedup.hashing import (
    MinHasher,
    band_keys,
    estimated_jaccard,
    exact_hash,
    exact_jaccard,
    shingle_hashes,
)
from data.preprocess.dedup.lsh import DocInfo, UnionFind, bucket_edges, make_gid, removals, star_edges

from .conftest import config_for, write_jsonl


def jaccard(a: str, b: str) -> float:
    return exact_jaccard(shingle_hashes(a, 5), shingle_hashes(b, 5))


def near_duplicate(rng: random.Random, text: str, low: float = 0.8, high: float = 0.95) -> str:
    """A copy of `text` with random edits whose 5-gram Jaccard similarity lies in [low, high]."""
    edits = max(1, len(text) // 120)
    for _ in range(200):
        copy = synth.perturb(rng, text, edits)
        similarity = jaccard(text, copy)
        if low <= similarity <= high:
            return copy
        edits = edits + 1 if similarity > high else max(1, edits - 1)
    raise AssertionError("could not plant a near duplicate")


def test_signatures_are_deterministic_and_estimate_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=128, ngram=5, seed=3)
    errors = []
    for _ in range(100):
        a = synth.en_doc(rng)
        b = synth.perturb(rng, a, rng.randint(1, 40))
        assert np.array_equal(hasher.signature(a), MinHasher(128, 5, 3).signature(a))
        errors.append(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - jaccard(a, b))
    assert abs(np.mean(errors)) < 0.01 and np.std(errors) < 0.05


def test_exact_hash_ignores_case_space_and_punctuation():
    assert exact_hash("Hello,  World!\n") == exact_hash("hello world")
    assert exact_hash("你好，世界。") == exact_hash("你好 世界")
    assert exact_hash("hello world") != exact_hash("hello word")


def test_band_keys_and_buckets():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4]], dtype=np.uint32)
    keys = band_keys(sigs, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] == keys[2, 1] and keys[1, 1] != keys[0, 1]
    left, right = bucket_edges(np.array([5, 9, 5, 5, 9]), np.array([40, 30, 10, 20, 50]))
    assert sorted(zip(left.tolist(), right.tolist(), strict=True)) == [(10, 20), (10, 40), (30, 50)]
    assert star_edges([40, 10, 20]) == [(10, 20), (10, 40)]


def test_keeper_is_the_best_quality_then_the_longest_then_the_first():
    uf = UnionFind()
    for a, b in ((1, 2), (2, 3), (7, 8)):
        uf.union(a, b)
    clusters = uf.clusters()
    assert sorted(map(tuple, clusters.values())) == [(1, 2, 3), (7, 8)]
    infos = {
        1: DocInfo(100, 0.2, 11),
        2: DocInfo(50, 0.9, 22),
        3: DocInfo(300, math.nan, 11),
        7: DocInfo(10, math.nan, 5),
        8: DocInfo(10, math.nan, 5),
    }
    by_quality = removals(clusters, infos, "quality")
    assert {g: r.keeper for g, r in by_quality.items()} == {1: 2, 3: 2, 8: 7}
    assert by_quality[8].rule == "dedup_exact" and by_quality[1].rule == "dedup_near"
    by_length = removals(clusters, infos, "longest")
    assert {g: r.keeper for g, r in by_length.items()} == {1: 3, 2: 3, 8: 7}
    assert by_length[1].rule == "dedup_exact"  # same exact hash as the keeper


def planted_corpus(tmp_path, language: str, originals: int = 300, planted: int = 150):
    rng = random.Random(11 if language == "zh" else 12)
    make = synth.zh_doc if language == "zh" else synth.en_doc
    texts = [make(rng, rng.randint(10, 30)) for _ in range(originals)]
    pairs = []
    records = [{"id": f"o{i}", "text": t} for i, t in enumerate(texts)]
    for i in range(planted):
        records.append({"id": f"n{i}", "text": near_duplicate(rng, texts[i])})
        pairs.append((f"o{i}", f"n{i}"))
    rng.shuffle(records)
    write_jsonl(tmp_path / "a.jsonl", records[::2])
    write_jsonl(tmp_path / "b.jsonl.gz", records[1::2])
    return sorted(tmp_path.glob("*.jsonl*")), pairs


def kept_ids(out):
    return {json.loads(line)["id"] for p in out.glob("part-*.jsonl") for line in p.open()}


@pytest.mark.parametrize("language", ["zh", "en"])
def test_recall_and_false_positives_on_planted_near_duplicates(tmp_path, language):
    inputs, pairs = planted_corpus(tmp_path, language)
    report = run_dedup(config_for(tmp_path), inputs, tmp_path / "out")
    kept = kept_ids(tmp_path / "out")
    found = sum(1 for a, b in pairs if (a in kept) != (b in kept))
    assert found / len(pairs) >= 0.95, (found, len(pairs))
    assert all(a in kept or b in kept for a, b in pairs)  # a cluster always keeps one document
    distinct = [f"o{i}" for i in range(len(pairs), 300)]
    false_positives = sum(1 for d in distinct if d not in kept)
    assert false_positives / len(distinct) <= 0.01
    assert report["docs_in"] == report["docs_out"] + sum(report["rejected"].values())


def test_exact_duplicates_and_quality_keeper_end_to_end(tmp_path):
    rng = random.Random(4)
    base, other = synth.en_doc(rng, 20), synth.zh_doc(rng, 20)
    records = [
        {"id": "first", "text": base},
        {"id": "shouty", "text": base.upper()},  # same normalized text and length: the first stays
        {"id": "low", "text": other, "quality": 0.1},
        {"id": "high", "text": near_duplicate(rng, other), "quality": 0.9},
        {"id": "alone", "text": synth.en_doc(rng, 20)},
    ]
    inputs = [write_jsonl(tmp_path / "in.jsonl", records)]
    run_dedup(config_for(tmp_path), inputs, tmp_path / "out")
    assert kept_ids(tmp_path / "out") == {"first", "high", "alone"}
    rejected = {
        json.loads(line)["id"]: json.loads(line)
        for p in (tmp_path / "out/rejected").glob("*.jsonl")
        for line in p.open()
    }
    assert rejected["shouty"]["rule"] == "dedup_exact" and rejected["shouty"]["duplicate_of"] == "in.jsonl:1"
    assert rejected["low"]["rule"] == "dedup_near" and rejected["low"]["duplicate_of"] == "in.jsonl:4"
    assert make_gid(1, 4) == (1 << 32) | 4


def test_verify_none_warns_that_threshold_is_unused(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": synth.en_doc(random.Random(1))}])
    config = config_for(tmp_path, **{"dedup.verify": "none", "dedup.threshold": 0.9})
    with pytest.warns(UserWarning, match=r"threshold \(0.9\) is not applied"):
        run_dedup(config, [path], tmp_path / "out")


def test_signature_progress_counts_bytes_not_characters(tmp_path):
    from data.preprocess.dedup.local import signature_task
    from data.preprocess.engines.local import Progress
    from data.preprocess.stage import FileTask

    records = [{"id": f"z{i}", "text": synth.zh_doc(random.Random(i))} for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    seen = []
    progress = Progress(lambda docs, nbytes: seen.append((docs, nbytes)), every_s=0)
    signature_task(FileTask(0, path, tmp_path / "out", config_for(tmp_path)), progress)
    progress.flush()
    assert sum(d for d, _ in seen) == 5 and sum(b for _, b in seen) == path.stat().st_size


def channel_corpus(tmp_path, per_channel: int = 40, planted: int = 15):
    """Two channels, each with `planted` near duplicates of Jaccard 0.74-0.80 to their originals."""
    rng = random.Random(5)
    records = []
    for channel in ("news", "wiki"):
        texts = [synth.en_doc(rng, rng.randint(10, 20)) for _ in range(per_channel)]
        records += [{"id": f"{channel}{i}", "text": t, "channel": channel} for i, t in enumerate(texts)]
        for i in range(planted):
            copy = near_duplicate(rng, texts[i], low=0.74, high=0.8)
            records.append({"id": f"{channel}-dup{i}", "text": copy, "channel": channel})
    rng.shuffle(records)
    write_jsonl(tmp_path / "a.jsonl", records[::2])
    write_jsonl(tmp_path / "b.jsonl", records[1::2])
    return sorted(tmp_path.glob("*.jsonl"))


PER_CHANNEL = {"dedup.threshold": 0.9, "dedup.channel_thresholds": {"news": 0.7, "wiki": 0.85}}


def test_per_channel_thresholds_drop_loose_duplicates_only_where_the_channel_allows(tmp_path):
    inputs = channel_corpus(tmp_path)
    report = run_dedup(config_for(tmp_path, **PER_CHANNEL), inputs, tmp_path / "o")
    kept = kept_ids(tmp_path / "o")
    # news (0.7): nearly every 0.74-0.80 pair loses one member (LSH recall at 0.74 is ~0.99);
    # wiki (0.85): every pair stays whole (exact verification)
    news_pairs = [(f"news{i}" in kept, f"news-dup{i}" in kept) for i in range(15)]
    assert sum(1 for pair in news_pairs if pair.count(True) == 1) >= 13
    assert all(True in pair for pair in news_pairs)  # a cluster always keeps one document
    assert all(f"wiki{i}" in kept and f"wiki-dup{i}" in kept for i in range(15))
    assert report["channel"]["wiki"]["docs_out"] == 55


def test_channel_threshold_out_of_range_is_one_error_naming_the_key(tmp_path):
    from megatron_patches.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dedup.channel_thresholds.news must be a number in \(0, 1\]"):
        config_for(tmp_path, **{"dedup.channel_thresholds": {"news": 1.5}})


HEADER = "Home | World | Business | Technology | Sport"
FOOTER = "Copyright 2024 Example News Network. All rights reserved."
CODE_LINE = "        return self._value  # shared by many files"


def boilerplate_corpus(tmp_path):
    """News with a shared header and footer (3 of them nothing else), code sharing one line."""
    rng = random.Random(8)
    bodies = [synth.en_doc(rng, 6) for _ in range(30)]
    records = [
        {"id": f"news{i}", "text": f"{HEADER}\n{body}\n{FOOTER.upper()}", "channel": "news"}
        for i, body in enumerate(bodies)
    ]
    shells = [f"{HEADER}\n\n{FOOTER}", HEADER, f" {FOOTER}\n"]  # distinct, so exact dedup keeps them
    records += [{"id": f"shell{i}", "text": text, "channel": "news"} for i, text in enumerate(shells)]
    records += [
        {"id": f"code{i}", "text": f"def f{i}():\n{CODE_LINE}\n# {synth.en_doc(rng, 2)}", "channel": "code"}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "a.jsonl", records[::2])
    write_jsonl(tmp_path / "b.jsonl", records[1::2])
    return sorted(tmp_path.glob("*.jsonl")), dict(enumerate(bodies))


LINES = {"dedup.line_min_docs": 5, "dedup.line_channels": ["news"]}


def test_line_dedup_cuts_shared_boilerplate_lines_and_records_them(tmp_path):
    inputs, bodies = boilerplate_corpus(tmp_path)
    report = run_dedup(config_for(tmp_path, **LINES), inputs, tmp_path / "o")
    kept = {r["id"]: r for p in (tmp_path / "o").glob("part-*.jsonl") for r in map(json.loads, p.open())}
    assert {i: kept[f"news{i}"]["text"] for i in range(30)} == bodies  # case-insensitive match
    assert all(CODE_LINE in kept[f"code{i}"]["text"] for i in range(10))  # code is not in line_channels
    assert not any(f"shell{i}" in kept for i in range(3))
    records = [json.loads(line) for line in (tmp_path / "o" / "rejected" / "dedup_lines.jsonl").open()]
    assert sorted(r["id"] for r in records if "text" in r) == ["shell0", "shell1", "shell2"]
    assert sum(r["value"] for r in records) == report["lines_cut"]["dedup_lines"] == 64
    assert report["rejected"]["dedup_lines"] == 3 and report["boilerplate_lines"] == 2
    assert report["docs_in"] == report["docs_out"] + sum(report["rejected"].values()) == 43
