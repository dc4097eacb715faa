"""Continued pretraining from a Megatron-LM checkpoint: its ``args`` give the model, its first loss is HF's.

The run's own checkpoint then carries an ``args`` namespace with Megatron-LM's
names, which is what Megatron-LM's ``--use-checkpoint-args`` reads.
"""

import json

import pytest
import torch
import transformers

from megatron_patches import safe_load
from megatron_patches.formats.megatron_lm_args import model_config_from_args
from megatron_patches.training import run
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_pretrained import _args
from tests.tools.convert import megatron_lm
from tests.tools.convert.tiny import save_hf

ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "groups", "head_dim", "vocab_size", "swiglu")
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1"]


def _first_global_batch(args) -> list[dict]:
    """The micro-batches of iteration 1, built by the trainer's own data code (TP 2, DP 1)."""
    from megatron_patches.training.config import load_config
    from megatron_patches.training.data import DatasetTokenizer, PhaseData
    from megatron_patches.training.validate import plan_run

    cfg = load_config(None, args)
    plan = plan_run(cfg, world_size=2)
    tokenizer = DatasetTokenizer(plan.data.eod_id, cfg.model.vocab_size)
    data = PhaseData(plan.phases, cfg.data, tokenizer, cfg.seed, f"{cfg.run_dir}/data_cache", 0, 0, 1)
    data.enter(plan.phases[0])
    return data.train_batches(0)


def _hf_loss(hf_dir, batches) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"]).logits.float()
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
            )
            mask = batch["loss_mask"].flatten().float()
            loss_sum += float((losses * mask).sum())
            tokens += float(mask.sum())
    return loss_sum / tokens


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_training_starts_from_a_megatron_lm_checkpoint_with_the_hf_models_loss(tmp_path, fmt):
    hf_dir = save_hf("llama_gqa", tmp_path / "hf", seed=3)  # GQA, untied, vocab 100
    if fmt == "torch":
        root = megatron_lm.legacy(hf_dir, tmp_path / "megatron_lm", "llama_gqa", 2, 1, "local")
    else:
        root = megatron_lm.torch_dist(hf_dir, tmp_path / "megatron_lm", "llama_gqa")
    prefix = write_corpus(tmp_path / "data", "en", 60, 100, seed=5)
    # Megatron-LM's args record only the padded vocabulary (256 at TP 2); the tokenizer's size is the run's.
    args = [*_args(tmp_path / "run", prefix, root), *TP2, "checkpoint.save_at_end=true"]
    args.append("model.vocab_size=100")

    assert run_on_ranks(run.main, 2, args, timeout=600) == [0, 0]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    [batches] = run_on_ranks(_first_global_batch, 1, args)
    want = _hf_loss(hf_dir, batches)
    assert first["iteration"] == 1 and abs(first["loss"] - want) < 1e-5 * max(1.0, want), (first, want)

    saved = safe_load.load_common(tmp_path / "run" / "checkpoints" / "iter_0000001")["args"]
    assert (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size) == (2, 1)
    source = model_config_from_args(megatron_lm.megatron_lm_namespace("llama_gqa", 2, 1, "local"), "source")
    again = model_config_from_args(saved, "saved")
    for name in ARCHITECTURE:
        assert getattr(again, name) == getattr(source, name), name
