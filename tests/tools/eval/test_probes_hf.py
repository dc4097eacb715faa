"""The training probe file scored on an HF model: the hand computation's numbers, from the CLI too."""

import json

import pytest

from megatron_patches.probe_scoring import load_probes
from tests.probe_reference import PROBES_YAML, hand_scores
from tests.tiny_hf import build_model
from tests.tools.eval.cli import run_eval
from tools.eval.probes import score_hf
from tools.hf_runtime.loading import load_model, load_tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_scores_equal_the_hand_computation_from_the_models_logits(tmp_path, family):
    path = build_model(tmp_path / family, family=family, seed=2)
    (tmp_path / "probes.yaml").write_text(PROBES_YAML)
    model, tokenizer = load_model(path, device="cpu"), load_tokenizer(path)
    scores = score_hf(model, tokenizer, load_probes(tmp_path / "probes.yaml"), micro_batch_size=3)
    expected = hand_scores(tokenizer, lambda ids: model(input_ids=ids).logits)
    assert scores == pytest.approx(expected, rel=1e-6, abs=1e-5)

    out = tmp_path / "scores.json"
    proc = run_eval(
        "probes", "--hf", str(path), "--probes", str(tmp_path / "probes.yaml"), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    logged = json.loads(out.read_text())
    assert logged == pytest.approx({f"probe/{k}": v for k, v in expected.items()}, rel=1e-6, abs=1e-5)


def test_cli_names_a_target_that_tokenizes_to_nothing(tmp_path):
    path = build_model(tmp_path / "llama")
    (tmp_path / "probes.yaml").write_text('- {name: empty, prefix: "the capital", target: ""}\n')
    proc = run_eval("probes", "--hf", str(path), "--probes", str(tmp_path / "probes.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m tools.eval: error: probe 'empty': '' tokenizes to nothing; nothing to score"
    )
