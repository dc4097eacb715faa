"""Mixture-of-Experts conversion: Mixtral, Qwen2-MoE and Qwen3-MoE at odd shapes (6 or 12 experts, top-3,
vocabulary 100, Qwen2-MoE with a dense first layer and its gated shared expert).

Proven as for dense families: HF -> Megatron -> HF is bit-exact at TP2 x PP2 x EP2; re-sharding
EP 2 -> 4 -> 1 gives the same rank files as converting straight from HF; and on 4 gloo ranks
(TP2 x EP2 x PP2, experts unsplit, ETP=1, the CPU-capable layout) Megatron-Core's MoE layers compute
the HF models' logits.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

from megatron_patches import safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.safe_load import safe_torch_load
from tests.dist import run_on_ranks
from tests.tools.convert import tiny
from tests.tools.convert.test_logits import _forward, _hf_logits, _save_torch_dist, _tokens
from tools.convert import commands
from tools.convert.mapping import expert_place, global_expert

CASES = list(tiny.MOE_CASES)
SAVED = CASES.index("qwen2_moe")  # saved as torch_dist by the ranks: dense + MoE layers, shared expert


def test_expert_placement_is_megatron_cores_contiguous_blocks():
    # SequentialMLP: EP rank r holds experts r * E/EP .. (r + 1) * E/EP - 1, numbered from 0.
    assert [expert_place(j, 12, 4) for j in (0, 2, 3, 11)] == [(0, 0), (0, 2), (1, 0), (3, 2)]
    assert all(global_expert(*reversed(expert_place(j, 6, 2)), 6, 2) == j for j in range(6))
    with pytest.raises(ConfigError, match=r"num_moe_experts \(6\) is not divisible by EP \(4\)"):
        expert_place(0, 6, 4)


@pytest.mark.parametrize(
    ("dirs", "args_pp", "grid"),
    [
        (["mp_rank_00_000", "mp_rank_00_001"], 1, (1, 1, 2)),  # Megatron-LM leaves out _PPP at PP=1
        (["mp_rank_00_000", "mp_rank_00_001"], 2, (1, 2, 1)),
        ([f"mp_rank_0{t}_00{p}_00{e}" for t in "01" for p in "01" for e in "012"], 2, (2, 2, 3)),
    ],
)
def test_legacy_grid_reads_megatron_lm_rank_directories(dirs, args_pp, grid, tmp_path):
    for name in dirs:
        (tmp_path / name).mkdir()
        args = argparse.Namespace(pipeline_model_parallel_size=args_pp)
        torch.save({"model": {}, "args": args}, tmp_path / name / ckpt_format.RANK_FILE)
    assert ckpt_format.legacy_grid(tmp_path) == grid
    (tmp_path / dirs[-1] / ckpt_format.RANK_FILE).unlink()
    with pytest.raises(ConfigError, match=f"incomplete checkpoint: .*{dirs[-1]}"):
        ckpt_format.legacy_grid(tmp_path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {case: tiny.save_hf(case, root / case, seed=20 + n) for n, case in enumerate(CASES)}


def _rank_files(release: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        path.parent.name: safe_torch_load(path, path)["model"]
        for path in sorted(release.glob("mp_rank_*/model_optim_rng.pt"))
    }


def _assert_same_rank_files(expected: Path, actual: Path) -> None:
    want, got = _rank_files(expected / "release"), _rank_files(actual / "release")
    assert sorted(want) == sorted(got)
    for rank, tensors in want.items():
        assert sorted(tensors) == sorted(got[rank]), rank
        for name, tensor in tensors.items():
            if tensor is not None:
                assert torch.equal(tensor, got[rank][name]), (rank, name)


@pytest.mark.parametrize("case", CASES)
def test_hf_to_mcore_to_hf_is_bit_exact_at_tp2_pp2_ep2(case, hf_dirs, tmp_path):
    commands.hf2mcore(hf_dirs[case], tmp_path / "mcore", tp=2, pp=2, ep=2, quiet=True)
    release = tmp_path / "mcore" / "release"
    assert ckpt_format.legacy_grid(release) == (2, 2, 2)
    rank = ckpt_format.load_rank(release, 1, 1, 2, ep_rank=1, ep_size=2)["model"]
    experts = tiny.MOE_CASES[case][1].get("num_experts") or tiny.MOE_CASES[case][1].get("num_local_experts")
    local = {name.split(".local_experts.")[1].split(".")[0] for name in rank if ".local_experts." in name}
    assert local == {str(j) for j in range(experts // 2)}  # EP rank 1 numbers its experts from 0

    commands.mcore2hf(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dirs[case]), tiny.hf_tensors(tmp_path / "hf"))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    source = transformers.AutoConfig.from_pretrained(hf_dirs[case]).to_dict()
    assert {**config, "_name_or_path": ""} == {**source, "_name_or_path": ""}


@pytest.mark.parametrize("case", CASES)
def test_export_without_hf_files_derives_a_config_computing_the_same_logits(case, hf_dirs, tmp_path):
    """A checkpoint trained from scratch has only its model_config: the exported config must route alike."""
    assert_export_without_hf_files_computes_the_same_logits(hf_dirs[case], tmp_path, tp=2, ep=2)


def assert_export_without_hf_files_computes_the_same_logits(source: Path, tmp_path: Path, **target) -> None:
    """Convert ``source``, drop the HF side files, export: same architecture and exactly the same logits."""
    commands.hf2mcore(source, tmp_path / "mcore", quiet=True, **target)
    for side_file in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (tmp_path / "mcore" / side_file).unlink(missing_ok=True)
    commands.mcore2hf(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    architecture = transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures
    assert architecture == transformers.AutoConfig.from_pretrained(source).architectures
    tokens = _tokens()
    assert torch.equal(_hf_logits(tmp_path / "hf", tokens), _hf_logits(source, tokens))


def test_resharding_ep2_to_ep4_to_ep1_is_bit_exact(hf_dirs, tmp_path):
    source = hf_dirs["qwen2_moe"]  # 12 experts, a dense layer, a gated shared expert
    layouts = {"ep2": dict(tp=2, pp=2, ep=2, etp=1), "ep4": dict(tp=1, pp=1, ep=4), "ep1": dict(tp=2, pp=1)}
    previous = None
    for name, target in layouts.items():
        commands.hf2mcore(source, tmp_path / f"direct_{name}", quiet=True, **target)
        if previous is not None:
            commands.mcore2mcore(previous, tmp_path / name, quiet=True, **target)
            _assert_same_rank_files(tmp_path / f"direct_{name}", tmp_path / name)
        previous = tmp_path / (name if previous is not None else f"direct_{name}")
    # mp_rank_TT_EEE: Megatron-LM leaves out _PPP at PP=1; the recorded pipeline tells it from mp_rank_TT_PPP.
    assert ckpt_format.legacy_grid(tmp_path / "ep4" / "release") == (1, 1, 4)
    commands.mcore2hf(previous, tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "hf"))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (dict(ep=5), "num_moe_experts (12) is not divisible by EP (5)"),
        (dict(tp=2, etp=4), "must be 1 or TP (2)"),
        (dict(moe_grouped_gemm=True), "--moe-grouped-gemm is supported with --spec te only"),
    ],
)
def test_bad_expert_layouts_are_refused_before_writing(target, message, hf_dirs, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        commands.hf2mcore(hf_dirs["qwen2_moe"], tmp_path / "out", quiet=True, **target)
    assert not (tmp_path / "out").exists()


def test_ep_on_a_dense_model_is_refused(tmp_path):
    source = tiny.save_hf("llama_gqa", tmp_path / "hf")
    with pytest.raises(ConfigError, match="EP=2 needs an MoE model"):
        commands.hf2mcore(source, tmp_path / "out", ep=2, quiet=True)


def _stored_shapes(iter_dir: Path) -> dict[str, tuple[int, ...] | None]:
    stored = safe_load.verify_torch_dist(iter_dir).metadata.state_dict_metadata
    return {key: tuple(meta.size) if hasattr(meta, "size") else None for key, meta in stored.items()}


def _megatron_logits(
    checkpoints: list[str], tokens: torch.Tensor, torch_dist_root: str, pp: int = 2, saved: int = SAVED
) -> list:
    """Each checkpoint's logits on 4 gloo ranks at TP2 x PP ``pp`` x EP2 (experts unsplit); checkpoint
    ``saved`` is also saved as torch_dist the way the trainer saves."""
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    results = []
    for n, root in enumerate(checkpoints):
        # gloo's all-to-all needs the alltoall dispatcher; TP > 1 MoE runs with sequence parallel.
        cfg = dataclasses.replace(ckpt_format.read_model_config(root), moe_token_dispatcher_type="alltoall")
        layout = parallel.Layout(4, 2, pp, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
        parallel.initialize(layout, seed=n, model=cfg)
        ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        ep_rank = ps.get_expert_model_parallel_rank()
        state, _ = ckpt_format.load_model_for_rank(root, *ranks, pp, ep_rank=ep_rank, ep_size=2)
        model = build_model_for_this_rank(cfg, sequence_parallel=True)
        model.load_state_dict(state, strict=True)
        model.eval()
        results.append(_forward(model, tokens))
        if n == saved:
            _save_torch_dist(model, cfg, torch_dist_root)  # as the trainer saves (Megatron-Core's layout)
        ps.destroy_model_parallel()
    return results


@pytest.mark.slow
def test_tp2_ep2_pp2_logits_match_hf(hf_dirs, tmp_path):
    tokens = _tokens()
    expected, checkpoints = [], []
    for case in CASES:
        expected.append(_hf_logits(hf_dirs[case], tokens))
        out = tmp_path / case
        commands.hf2mcore(hf_dirs[case], out, tp=2, pp=2, ep=2, etp=1, quiet=True)
        checkpoints.append(str(out))

    per_rank = run_on_ranks(_megatron_logits, 4, checkpoints, tokens, str(tmp_path / "trainer"), timeout=300)
    got = [logits for case in zip(*per_rank, strict=True) for logits in case if logits is not None]
    assert len(got) == len(CASES)
    for case, want, logits in zip(CASES, expected, got, strict=True):
        assert (logits[..., : want.shape[-1]] - want).abs().max() <= 1e-4, case

    # The trainer's torch_dist checkpoint of the MoE model (experts stacked per layer) exports bit-exactly,
    source = hf_dirs[CASES[SAVED]]
    commands.mcore2hf(tmp_path / "trainer", tmp_path / "export", hf_config=str(source), quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "export"))
    # and hf2mcore --format torch_dist writes the keys and shapes Megatron-Core wrote (vocabulary: TP=1's).
    commands.hf2mcore(source, tmp_path / "dist", fmt="torch_dist", quiet=True)
    written = _stored_shapes(tmp_path / "dist" / "release")
    saved = _stored_shapes(tmp_path / "trainer" / ckpt_format.iteration_dir_name(7))
    assert written.keys() == saved.keys()
    assert {k: v for k, v in written.items() if saved[k] != v} == {
        "embedding.word_embeddings.weight": (128, 64),
        "output_layer.weight": (128, 64),
    }
