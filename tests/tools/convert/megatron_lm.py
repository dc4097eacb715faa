"""Checkpoints laid out as Megatron-LM's ``save_checkpoint`` writes them, from a tiny HF model.

The weights come from ``hf2mcore`` (a GPTModel state dict under local or TE key
names, the names Megatron-LM's model uses); everything this project adds
(``model_config``, ``pipeline_layers``) is dropped, and Megatron-LM's entries take
its place: the run's ``args`` namespace, ``checkpoint_version``, ``iteration``,
optimizer, scheduler and RNG state, in ``iter_0000010/`` with the tracker at 10.
The ``torch_dist`` one is saved by Megatron-Core's ``dist_checkpointing.save`` from
a TP=2 GPTModel built by the trainer's builder, as Megatron-LM saves it.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import numpy
import torch

from megatron_patches.formats import checkpoint as ckpt_format
from tests.dist import run_on_ranks
from tests.tools.convert import tiny
from tools.convert import commands, mcore_io

ITERATION = 10
HF_VOCAB = tiny.BASE["vocab_size"]


def megatron_lm_namespace(
    case: str, tp: int, pp: int, impl: str, vpp: int | None = None
) -> argparse.Namespace:
    """What ``pretrain_gpt.py`` would hold in ``args`` for the tiny HF case, with some of its other flags."""
    from megatron.core.transformer.enums import AttnBackend

    _, overrides = tiny.CASES[case]
    hf = {**tiny.BASE, **overrides}
    heads, groups = hf["num_attention_heads"], hf["num_key_value_heads"]
    return argparse.Namespace(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        group_query_attention=groups != heads,
        num_query_groups=groups,
        kv_channels=hf["hidden_size"] // heads,
        seq_length=128,
        max_position_embeddings=hf["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=hf["rms_norm_eps"],
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=not overrides.get("tie_word_embeddings", False),
        make_vocab_size_divisible_by=128,
        padded_vocab_size=-(-HF_VOCAB // (128 * tp)) * 128 * tp,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        transformer_impl=impl,
        attention_backend=AttnBackend.auto,
        params_dtype=torch.float32,
        tokenizer_type="HuggingFaceTokenizer",
        lr=3e-4,
        data_path=["/data/corpus_text_document"],
        micro_batch_size=2,
    )


def _rng_state() -> list[dict]:
    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": numpy.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
        }
    ]


def _megatron_lm_entries(args: argparse.Namespace | None) -> dict:
    entries = {
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": ITERATION * 8},
        "num_floating_point_operations_so_far": 1.0e12,
    }
    return entries if args is None else {"args": args, **entries}


def legacy(
    hf_dir: Path,
    out: Path,
    case: str,
    tp: int,
    pp: int,
    spec: str,
    with_args: bool = True,
    vpp: int | None = None,
) -> Path:
    """``out/iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt`` as Megatron-LM writes them (with ``vpp``:
    ``model0``, ``model1``, ... in each, as its ``generate_state_dict`` names the model chunks)."""
    ours = out.parent / f"{out.name}.hf2mcore"
    commands.hf2mcore(str(hf_dir), str(ours), tp=tp, pp=pp, vpp=vpp, spec=spec, quiet=True)
    impl = "transformer_engine" if spec == "te" else "local"
    args = megatron_lm_namespace(case, tp, pp, impl, vpp) if with_args else None
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            mine = ckpt_format.load_rank(ours / "release", tp_rank, pp_rank, pp)
            state = {
                **{key: mine[key] for key in ckpt_format.model_keys(vpp or 1)},
                "optimizer": {"optimizer": {"state": {}, "param_groups": []}, "fp32_from_fp16_params": []},
                "rng_state": _rng_state(),
                **_megatron_lm_entries(args),
            }
            path = ckpt_format.rank_file(out / f"iter_{ITERATION:07d}", tp_rank, pp_rank, pp)
            path.parent.mkdir(parents=True)
            torch.save(state, path)
    (out / ckpt_format.TRACKER_FILE).write_text(str(ITERATION))
    shutil.rmtree(ours)
    return out


def torch_dist(hf_dir: Path, out: Path, case: str, with_args: bool = True) -> Path:
    """``out/iter_0000010/`` as Megatron-LM saves it: ``dist_checkpointing.save`` on 2 TP ranks."""
    release = out.parent / f"{out.name}.hf2mcore"
    commands.hf2mcore(str(hf_dir), str(release), tp=2, quiet=True)
    args = megatron_lm_namespace(case, 2, 1, "local") if with_args else None
    assert run_on_ranks(_save_torch_dist, 2, str(release), str(out), args, timeout=300) == [None, None]
    (out / ckpt_format.TRACKER_FILE).write_text(str(ITERATION))
    shutil.rmtree(release)
    return out


def _save_torch_dist(release: str, out: str, args: argparse.Namespace | None) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    cfg = ckpt_format.read_model_config(release)
    parallel.initialize(parallel.Layout(2, 2, 1), seed=0, model=cfg)
    tp_rank = ps.get_tensor_model_parallel_rank()
    state, _ = ckpt_format.load_model_for_rank(release, tp_rank, 0, 1)
    model = build_model_for_this_rank(cfg)
    model.load_state_dict(state, strict=True)
    rng = ShardedObject("rng_state", _rng_state(), (1, 2), (0, tp_rank), replica_id=0)
    iter_dir = Path(out) / f"iter_{ITERATION:07d}"
    if tp_rank == 0:
        iter_dir.mkdir(parents=True)
    torch.distributed.barrier()
    entries = {"model": model.sharded_state_dict(), "rng_state": rng, **_megatron_lm_entries(args)}
    dist_checkpointing.save(entries, str(iter_dir))
    mcore_io.stop_dist_checkpoint_workers()  # the harness may kill this rank before a normal exit
    ps.destroy_model_parallel()


def plant(path: Path, key: str, payload: object) -> None:
    """Replace ``key`` of the torch.save dict at ``path`` with ``payload`` (pickled without restriction)."""
    state = torch.load(path, weights_only=False)
    state[key] = payload
    torch.save(state, path)
