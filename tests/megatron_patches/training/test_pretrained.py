"""Continued pretraining from a HF model: the trainer's first loss is the HF model's loss."""

import json

import pytest
import torch
import transformers

from megatron_patches.errors import ConfigError
from megatron_patches.training import checkpoint, run
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import EOD, write_corpus
from tests.tools.convert.tiny import assert_same_tensors, hf_tensors, save_hf
from tools.convert import commands

SEQ = 32


def _args(run_dir, prefix, mcore_dir) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.data_path=[{prefix}]",
        f"data.eod_id={EOD}",
        f"data.seq_length={SEQ}",
        "data.split=95,5,0",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.train_iters=1",
        "optimizer.lr_warmup_iters=0",
        "logging.log_interval=1",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        f"checkpoint.pretrained_checkpoint={mcore_dir}",
        "checkpoint.use_checkpoint_args=true",
        "checkpoint.save_at_end=false",
    ]


def _train(args):
    return run.main(args)


def _first_global_batch(args) -> list[dict]:
    """The micro-batches of iteration 1, built by the trainer's own data code (DP = 1 here)."""
    from megatron_patches.training.config import load_config
    from megatron_patches.training.data import DatasetTokenizer, PhaseData
    from megatron_patches.training.validate import plan_run

    cfg = load_config(None, args)
    plan = plan_run(cfg, world_size=4)
    data = PhaseData(
        plan.phases,
        cfg.data,
        DatasetTokenizer(plan.data.eod_id, cfg.model.vocab_size),
        cfg.seed,
        f"{cfg.run_dir}/data_cache",
        0,
        dp_rank=0,
        dp_size=1,
    )
    data.enter(plan.phases[0])
    return data.train_batches(0)


@pytest.mark.parametrize("fmt, vpp", [("torch", None), ("torch_dist", None), ("torch", 2)])
def test_first_iteration_loss_equals_hf_loss_on_the_same_batch(tmp_path, fmt, vpp):
    hf_dir = save_hf("llama_gqa", tmp_path / "hf", seed=3)  # GQA, untied, vocab 100
    # A legacy release is converted at the run's TP/PP(/VPP: model0, model1 per rank file);
    # torch_dist is re-sharded when loaded.
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), tp=2, pp=2, vpp=vpp, fmt=fmt, quiet=True)
    prefix = write_corpus(tmp_path / "data", "en", 60, 100, seed=5)
    args = _args(tmp_path / "run", prefix, tmp_path / "mcore")
    args += [f"parallel.virtual_pipeline_model_parallel_size={vpp}"] if vpp else []

    assert run_on_ranks(_train, 4, args, timeout=600) == [0] * 4
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    _assert_first_loss_is_hf_loss(first, hf_dir, args)


def _assert_first_loss_is_hf_loss(first: dict, hf_dir, args: list[str]) -> None:
    """The trainer's logged first loss equals the HF model's mean token loss on the same global batch."""
    [batches] = run_on_ranks(_first_global_batch, 1, args)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"]).logits.float()
            token_losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            mask = batch["loss_mask"].flatten().float()
            loss_sum += float((token_losses * mask).sum())
            tokens += float(mask.sum())
    assert first["iteration"] == 1 and first["tokens"] == tokens == 8 * SEQ
    assert abs(first["loss"] - loss_sum / tokens) < 1e-5 * max(1.0, loss_sum / tokens), (
        first,
        loss_sum / tokens,
    )


def test_an_expert_parallel_moe_release_starts_training_with_the_hf_loss(tmp_path):
    """A Mixtral-style release converted at EP 2 (mp_rank_00_00E files) loads rank by rank at EP 2;
    at another EP it is refused in one line naming the re-shard command."""
    from megatron_patches.training.config import load_config
    from megatron_patches.training.validate import plan_run

    hf_dir = save_hf("mixtral", tmp_path / "hf", seed=3)  # 6 experts, top-3
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), ep=2, quiet=True)
    prefix = write_corpus(tmp_path / "data", "en", 60, 100, seed=5)
    args = _args(tmp_path / "run", prefix, tmp_path / "mcore")
    args += ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
    with pytest.raises(ConfigError, match="converted for TP=1 PP=1 EP=2 but this run is TP=1 PP=1;"):
        plan_run(load_config(None, args), world_size=2)
    args += ["parallel.expert_model_parallel_size=2"]
    assert run_on_ranks(_train, 2, args, timeout=300) == [0, 0]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    _assert_first_loss_is_hf_loss(first, hf_dir, args)


def test_bf16_update_at_zero_lr_keeps_the_pretrained_weights_and_exports_them_as_bf16(tmp_path):
    """The distributed optimizer's fp32 main params must be the loaded weights, not the random init.

    With lr = weight decay = 0 an update changes nothing, so the trainer's checkpoint, exported
    with ``mcore2hf``, must hold exactly the HF weights rounded to bf16, stored as bf16.
    """
    hf_dir = save_hf("llama_gqa", tmp_path / "hf", seed=3)
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), quiet=True)
    prefix = write_corpus(tmp_path / "data", "en", 60, 100, seed=5)
    args = [
        *_args(tmp_path / "run", prefix, tmp_path / "mcore"),
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "train.bf16=true",
        "optimizer.lr=0",
        "optimizer.min_lr=0",
        "optimizer.weight_decay=0",
        "checkpoint.save_at_end=true",
    ]
    assert run_on_ranks(_train, 1, args, timeout=300) == [0]
    export = tmp_path / "export"
    commands.mcore2hf(str(tmp_path / "run" / "checkpoints"), str(export), hf_config=str(hf_dir), quiet=True)

    expected = {name: t.to(torch.bfloat16) for name, t in hf_tensors(hf_dir).items()}
    exported = hf_tensors(export)
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}  # not the optimizer's fp32 state
    config = json.loads((export / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    assert_same_tensors(expected, exported)


def test_uneven_pipeline_release_is_refused_in_one_line_before_any_rank_builds(tmp_path):
    """The trainer builds num_layers / PP layers per stage; a [1, 3] release would fail the strict load."""
    from megatron_patches.training.config import load_config
    from megatron_patches.training.validate import plan_run

    hf_dir = save_hf("llama_gqa", tmp_path / "hf")  # 4 layers
    commands.hf2mcore(str(hf_dir), str(tmp_path / "uneven"), tp=2, pp=2, first=1, quiet=True)
    commands.hf2mcore(str(hf_dir), str(tmp_path / "even"), tp=2, pp=2, quiet=True)
    prefix = write_corpus(tmp_path / "data", "en", 60, 100, seed=5)
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(None, _args(tmp_path / "run", prefix, tmp_path / "uneven")), world_size=4)
    message = str(err.value)
    assert "holds [1, 3] layers per pipeline stage but this run builds [2, 2] (num_layers=4, PP=2)" in message
    assert "mcore2mcore --tp 2 --pp 2" in message and "\n" not in message
    plan = plan_run(load_config(None, _args(tmp_path / "run", prefix, tmp_path / "even")), world_size=4)
    checkpoint.check_pretrained_layout(plan.pretrained, 2, 2, 4)
    with pytest.raises(ConfigError, match="was converted for TP=2 PP=2 but this run is TP=1 PP=2"):
        checkpoint.check_pretrained_layout(plan.pretrained, 1, 2, 4)
