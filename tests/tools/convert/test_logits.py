"""Converted checkpoints compute the HF model's logits in megatron-core GPTModel on TP=2 x PP=2 gloo ranks.

One 4-rank run covers Llama-3.1 (GQA + rope scaling), Qwen2 (qkv bias), Qwen3
(qk-norm, explicit head_dim), a tied-embedding model and DeepSeek-Coder's
linear rope scaling; it also saves one model as a Megatron-Core torch_dist
checkpoint (the trainer's format), which the CLI then exports back to HF
bit-exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import run_on_ranks
from tests.tools.convert import tiny
from tools.convert import commands, mcore_io

LOGIT_CASES = ["llama31", "qwen2", "qwen3", "llama_mha_tied", "deepseek_coder"]
BATCH, SEQ = 2, 12
REPO = Path(__file__).resolve().parents[3]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _forward(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits on the last stage's TP rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(batches, stage):
        return stage(next(batches), torch.arange(SEQ).expand(BATCH, -1), None), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(outputs[0])
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def _save_torch_dist(model, cfg, root: str) -> None:
    """What the trainer does at iteration 7: Megatron-Core's own distributed save."""
    from megatron.core import dist_checkpointing

    iter_dir = Path(root) / mcore_io.iteration_dir_name(7)
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True)
    torch.distributed.barrier()
    state = {
        "model": model.sharded_state_dict(),
        "model_config": cfg.to_dict(),
        "iteration": 7,
        "checkpoint_version": 3.0,
    }
    dist_checkpointing.save(state, str(iter_dir))
    mcore_io.stop_dist_checkpoint_workers()  # the harness may kill this rank before a normal exit
    if torch.distributed.get_rank() == 0:
        mcore_io.write_tracker(root, 7)


def _megatron_logits(checkpoints: list[str], tokens: torch.Tensor, torch_dist_root: str) -> list:
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    results = []
    for n, root in enumerate(checkpoints):
        cfg = mcore_io.read_model_config(root)
        parallel.initialize(parallel.Layout(4, 2, 2), seed=n, model=cfg)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        state, _ = mcore_io.load_model_for_rank(root, tp_rank, pp_rank, 2)
        model = build_model_for_this_rank(cfg)
        model.load_state_dict(state, strict=True)
        model.eval()
        results.append(_forward(model, tokens))
        if n == 0:
            _save_torch_dist(model, cfg, torch_dist_root)
        ps.destroy_model_parallel()
    return results


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.convert", *args, "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_tp2_pp2_logits_match_hf_and_trainer_checkpoint_exports_bit_exactly(tmp_path):
    tokens = _tokens()
    checkpoints, expected = [], []
    for n, case in enumerate(LOGIT_CASES):
        hf_dir = tiny.save_hf(case, tmp_path / "hf" / case, seed=10 + n)
        expected.append(_hf_logits(hf_dir, tokens))
        commands.hf2mcore(hf_dir, tmp_path / "mcore" / case, tp=2, pp=2, quiet=True)
        checkpoints.append(str(tmp_path / "mcore" / case))

    per_rank = run_on_ranks(_megatron_logits, 4, checkpoints, tokens, str(tmp_path / "trainer"), timeout=600)
    got = [logits for case in zip(*per_rank, strict=True) for logits in case if logits is not None]
    assert len(got) == len(LOGIT_CASES)
    for case, want, logits in zip(LOGIT_CASES, expected, got, strict=True):
        vocab = want.shape[-1]
        assert logits.shape[-1] >= vocab
        assert (logits[..., :vocab] - want).abs().max() <= 1e-4, case

    # The trainer's torch_dist checkpoint (saved at TP2/PP2) exports to the original HF weights.
    source = tmp_path / "hf" / LOGIT_CASES[0]
    done = _cli(
        "mcore2hf",
        "--mcore",
        str(tmp_path / "trainer"),
        "--out",
        str(tmp_path / "export"),
        "--hf-config",
        str(source),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mcore2hf: ") and "peak RSS" in done.stdout
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "export"))
    torch.testing.assert_close(_hf_logits(tmp_path / "export", tokens), expected[0], atol=0, rtol=0)


@pytest.mark.slow
def test_cli_torch_dist_output_round_trips(tmp_path):
    source = tiny.save_hf("qwen3", tmp_path / "hf", seed=3)
    done = _cli(
        "hf2mcore",
        "--hf",
        str(source),
        "--out",
        str(tmp_path / "dist"),
        "--format",
        "torch_dist",
        "--dtype",
        "bf16",
    )
    assert done.returncode == 0, done.stderr
    assert mcore_io.checkpoint_format(tmp_path / "dist" / "release") == "torch_dist"
    done = _cli(
        "mcore2mcore",
        "--mcore",
        str(tmp_path / "dist"),
        "--out",
        str(tmp_path / "legacy"),
        "--tp",
        "2",
        "--pp",
        "2",
    )
    assert done.returncode == 0, done.stderr
    commands.mcore2hf(tmp_path / "legacy", tmp_path / "back", quiet=True)
    expected = {name: t.to(torch.bfloat16) for name, t in tiny.hf_tensors(source).items()}
    tiny.assert_same_tensors(expected, tiny.hf_tensors(tmp_path / "back"))
