"""DeepSeek-V2-Lite and DeepSeek-V3 conversion: Multi-Latent Attention, shared experts, first-k-dense, V3's
sigmoid router with expert bias and group-limited routing, at odd shapes (v_head_dim != qk_head_dim,
6 routed experts, top-3 / top-4 of 3 groups, YaRN on V2-Lite).

HF -> Megatron -> HF is bit-exact at TP2 x EP3, and on 4 gloo ranks (TP2 x EP2 with sequence parallel,
experts unsplit: the MLA projections and experts placed as the converter writes them) Megatron-Core's
MLA and MoE layers compute the HF models' logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from tests.dist import run_on_ranks
from tests.tools.convert import tiny
from tests.tools.convert.test_logits import _hf_logits, _tokens
from tests.tools.convert.test_moe import (
    _megatron_logits,
    _stored_shapes,
    assert_export_without_hf_files_computes_the_same_logits,
)
from tools.convert import commands
from tools.convert.families import deepseek

CASES = list(tiny.DEEPSEEK_CASES)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_deepseek")
    return {case: tiny.save_hf(case, root / case, seed=40 + n) for n, case in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES)
def test_hf_to_mcore_to_hf_is_bit_exact_at_tp2_ep3(case, hf_dirs, tmp_path):
    commands.hf2mcore(hf_dirs[case], tmp_path / "mcore", tp=2, ep=3, quiet=True)
    assert ckpt_format.legacy_grid(tmp_path / "mcore" / "release") == (2, 1, 3)
    commands.mcore2hf(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dirs[case]), tiny.hf_tensors(tmp_path / "hf"))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    source = transformers.AutoConfig.from_pretrained(hf_dirs[case]).to_dict()
    assert {**config, "_name_or_path": ""} == {**source, "_name_or_path": ""}


@pytest.mark.parametrize("case", CASES)
def test_export_without_hf_files_derives_a_config_computing_the_same_logits(case, hf_dirs, tmp_path):
    """A DeepSeek-style model trained from scratch has only its model_config; its export must route alike."""
    assert_export_without_hf_files_computes_the_same_logits(hf_dirs[case], tmp_path)


def test_tp2_ep2_logits_match_hf(hf_dirs, tmp_path):
    tokens = _tokens()
    expected, checkpoints = [], []
    for case in CASES:
        expected.append(_hf_logits(hf_dirs[case], tokens))
        commands.hf2mcore(hf_dirs[case], tmp_path / case, tp=2, ep=2, etp=1, quiet=True)
        checkpoints.append(str(tmp_path / case))
    trainer = tmp_path / "trainer"
    # TP2 x PP1 x EP2 (the tiny models have 3 layers); the last (DeepSeek-V3) is also saved as torch_dist
    pp, saved = 1, len(CASES) - 1
    logits = run_on_ranks(_megatron_logits, 4, checkpoints, tokens, str(trainer), pp, saved, timeout=240)[0]
    for case, want, got in zip(CASES, expected, logits, strict=True):
        assert (got[..., : want.shape[-1]] - want).abs().max() <= 1e-4, case

    # Megatron-Core's own torch_dist save of the MLA + MoE model exports bit-exactly, and hf2mcore
    # --format torch_dist writes its keys and shapes (vocabulary: TP=1's padding).
    source = hf_dirs[CASES[-1]]
    commands.mcore2hf(trainer, tmp_path / "export", hf_config=str(source), quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "export"))
    commands.hf2mcore(source, tmp_path / "dist", fmt="torch_dist", quiet=True)
    written = _stored_shapes(tmp_path / "dist" / "release")
    saved = _stored_shapes(trainer / ckpt_format.iteration_dir_name(7))
    assert written.keys() == saved.keys()
    assert {k: v for k, v in written.items() if saved[k] != v} == {
        "embedding.word_embeddings.weight": (128, 64),
        "output_layer.weight": (128, 64),
    }


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        (deepseek.read_v3, dict(num_experts_per_tok=6), "top-2 scores; Megatron-Core by the top"),
        (deepseek.read_v3, dict(norm_topk_prob=False), "needs norm_topk_prob=true exactly when"),
        (deepseek.read_v3, dict(rms_norm_eps=1e-5), "rms_norm_eps must be 1e-06"),
        (deepseek.read_v3, dict(quantization_config={"quant_method": "fp8"}), "quantized DeepSeek"),
        (deepseek.read_v3, dict(rope_interleave=False), "rope_interleave=false is not supported"),
        (deepseek.read_v2, dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "top-1 scores"),
        (deepseek.read_v2, dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic' is not"),
    ],
)
def test_configs_megatron_core_would_compute_differently_are_refused(family, change, message, hf_dirs):
    case = "deepseek_v3" if family is deepseek.read_v3 else "deepseek_v2_lite"
    config = transformers.AutoConfig.from_pretrained(hf_dirs[case]).to_dict()
    with pytest.raises(ConfigError, match=message):
        family({**config, **change})
