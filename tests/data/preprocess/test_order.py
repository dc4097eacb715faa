"""tokenize.order: icp packs similar documents next to each other, spread moves copies apart; both
only permute documents, deterministically."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data.demo import synth
from data.preprocess.config import load_config
from data.preprocess.dedup.hashing import MinHasher
from data.preprocess.order import adjacent_jaccard, document_tokens, icp_order
from data.preprocess.pipeline import run_stage
from data.preprocess.tokenize import run_tokenize
from megatron_patches.errors import ConfigError

DEMO = Path(__file__).resolve().parents[3] / "data" / "demo"
CHANNELS = ("code", "en_web", "zh_web")


def demo_config(**overrides):
    return load_config(DEMO / "config.yaml", {"workers": 1, **overrides})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[Path]:
    """The demo corpus with channels (not deduplicated: its planted copies are still there)."""
    out = tmp_path_factory.mktemp("order") / "label"
    run_stage("label", demo_config(), sorted(DEMO.glob("raw/*.jsonl.gz")), out, overwrite=False)
    return sorted(out.glob("part-*.jsonl*"))


@pytest.fixture(scope="module")
def default_order(labelled, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("order") / "input"
    run_tokenize(demo_config(), labelled, out, tokenizer_dir)
    return out


def documents(out: Path, channel: str) -> list[bytes]:
    tokens, starts = document_tokens(out / f"{channel}_text_document", np.dtype(np.uint16))
    return [np.asarray(tokens[starts[i] : starts[i + 1]]).tobytes() for i in range(starts.size - 1)]


def test_icp_raises_adjacent_document_similarity_on_the_demo_corpus(
    labelled, default_order, tokenizer_dir, tmp_path
):
    report = run_tokenize(demo_config(**{"tokenize.order": "icp"}), labelled, tmp_path / "icp", tokenizer_dir)
    for channel in CHANNELS:
        before = adjacent_jaccard(default_order / f"{channel}_text_document", np.dtype(np.uint16))
        after = adjacent_jaccard(tmp_path / "icp" / f"{channel}_text_document", np.dtype(np.uint16))
        assert after >= 1.5 * before and after >= before + 0.05, (channel, before, after)
        assert report["order"][channel] == {
            "adjacent_jaccard_input": round(before, 4),
            "adjacent_jaccard_icp": round(after, 4),
        }
        # a permutation: the same documents, none lost or changed
        assert Counter(documents(tmp_path / "icp", channel)) == Counter(documents(default_order, channel))
        assert documents(tmp_path / "icp", channel) != documents(default_order, channel)


def test_icp_output_does_not_depend_on_workers_or_ranges(labelled, tokenizer_dir, tmp_path):
    one = demo_config(**{"tokenize.order": "icp", "tokenize.order_block_docs": 300})
    two = demo_config(
        **{"tokenize.order": "icp", "tokenize.order_block_docs": 300, "workers": 2, "range_mb": 0.05}
    )
    run_tokenize(one, labelled, tmp_path / "one", tokenizer_dir)
    run_tokenize(two, labelled, tmp_path / "two", tokenizer_dir)
    for path in sorted((tmp_path / "one").glob("*_text_document.*")):
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name


def test_spread_places_identical_documents_far_apart(labelled, default_order, tokenizer_dir, tmp_path):
    run_tokenize(demo_config(**{"tokenize.order": "spread"}), labelled, tmp_path / "spread", tokenizer_dir)
    for channel in ("code", "zh_web"):
        before, after = documents(default_order, channel), documents(tmp_path / "spread", channel)
        assert Counter(before) == Counter(after)
        assert closest_copies(before) < len(before) // 16  # the demo plants copies anywhere
        # a cluster of k near-duplicates is spread n / k apart; the demo's largest has 6 members
        assert closest_copies(after) >= len(after) // 8, channel


def closest_copies(docs: list[bytes]) -> int:
    """The smallest distance between two identical documents."""
    last: dict[bytes, int] = {}
    gaps = []
    for position, doc in enumerate(docs):
        if doc in last:
            gaps.append(position - last[doc])
        last[doc] = position
    assert gaps, "the corpus has no identical documents"
    return min(gaps)


def test_icp_chains_each_document_to_its_most_similar_unvisited_neighbour():
    rng = random.Random(3)
    english, chinese = synth.en_doc(rng, 12), synth.zh_doc(rng, 12)
    # two topics, alternating; within each, the second document is the first's closest relative
    texts = [english, chinese]
    texts += [synth.perturb(rng, english, 2), synth.perturb(rng, chinese, 2)]
    texts += [synth.perturb(rng, english, 60), synth.perturb(rng, chinese, 60)]
    hasher = MinHasher(num_perm=64, ngram=3)
    order = icp_order(np.stack([hasher.signature(t) for t in texts]))
    assert order.tolist() == [0, 2, 4, 1, 3, 5]  # a chain through one topic, then the next


def test_unknown_order_is_one_error():
    with pytest.raises(ConfigError, match=r"tokenize.order must be one of \['input', 'icp', 'spread'\]"):
        demo_config(**{"tokenize.order": "topic"})
