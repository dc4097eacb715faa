"""The memory plan against the real tensors: static bytes exactly, activations within 10%.

Static: the model, DDP buffers and distributed optimizer are built on gloo ranks
(after one optimizer step, so Adam's state exists) and every distinct storage is
summed. Activations: one micro-batch's forward on each pipeline stage, with the
bytes of every tensor autograd saves for backward (storages counted once).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.training.memory_plan import (
    PlanLayout,
    Precision,
    Workload,
    micro_batches_in_flight,
    plan_memory,
    stage_activation_bytes,
    static_bytes,
)
from tests.dist import run_on_ranks

# hidden 48: norm weights (48) are not a multiple of the buffer's 64-element alignment
TINY = dict(
    num_layers=4,
    hidden_size=48,
    ffn_hidden_size=100,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=200,
    max_position_embeddings=256,
)


def _storages_bytes(tensors) -> int:
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _static_on_rank(overrides: list[str], tp: int, pp: int) -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training import builder
    from megatron_patches.training.config import load_config

    cfg = load_config(None, [f"model.{k}={v}" for k, v in TINY.items()] + overrides)
    layout = parallel.Layout(torch.distributed.get_world_size(), tp, pp)
    parallel.initialize(layout, cfg.seed, cfg.model)
    objects = builder.build(cfg)
    objects.optimizer.step()  # Adam's m and v exist from the first step on
    model_tensors = [t for buffer in objects.model.buffers for t in (buffer.param_data, buffer.grad_data)]
    optimizer_tensors = []
    for optimizer in objects.optimizer.chained_optimizers:
        inner = optimizer.optimizer
        optimizer_tensors += [p for group in inner.param_groups for p in group["params"]]
        for state in inner.state.values():  # 0-dim "step" counters are bookkeeping, not per-param memory
            optimizer_tensors += [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    owned = _storages_bytes(model_tensors)
    total = _storages_bytes(model_tensors + optimizer_tensors)
    return ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), owned, total - owned


@pytest.mark.parametrize(
    "overrides, tp, pp",
    [
        # bf16 weights, fp32 master copies; small buckets; tied embeddings split into their own bucket
        (
            [
                "train.bf16=true",
                "ddp.overlap_grad_reduce=true",
                "ddp.bucket_size=3000",
                "model.untie_embeddings_and_output_weights=false",
            ],
            1,
            2,
        ),
        (["train.bf16=false"], 2, 1),  # fp32: the optimizer updates the weights in place
    ],
)
def test_static_bytes_equal_the_tensors_on_every_rank(overrides, tp, pp):
    world = 4
    results = run_on_ranks(_static_on_rank, world, overrides, tp, pp)
    bf16 = "train.bf16=true" in overrides
    tied = "model.untie_embeddings_and_output_weights=false" in overrides
    model = ModelConfig(**TINY, untie_embeddings_and_output_weights=not tied)
    layout = PlanLayout(tp, pp, world // (tp * pp))
    precision = Precision(bf16=bf16, bucket_size=3000 if bf16 else None)
    for stage, dp_rank, buffers, optimizer in results:
        weights, grads, planned_optimizer = static_bytes(model, layout, precision, stage, dp_rank)
        assert (weights + grads, planned_optimizer) == (buffers, optimizer), (stage, dp_rank)


def _activations_on_rank(layouts: list[dict], seq: int, micro: int) -> list[int]:
    """Bytes saved for backward by one forward of this rank's stage, per (recompute, SP) setting."""
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    measured = []
    for setting in layouts:
        model_cfg = ModelConfig(**TINY, **setting["model"])
        tp, pp = setting["tp"], setting["pp"]
        if not ps.model_parallel_is_initialized():
            parallel.initialize(parallel.Layout(torch.distributed.get_world_size(), tp, pp), 1234, model_cfg)
        gpt = build_model_for_this_rank(model_cfg, torch.bfloat16, sequence_parallel=setting["sp"])
        measured.append(_saved_bytes(gpt, model_cfg, seq, micro, tp if setting["sp"] else 1))
    return measured


def _saved_bytes(gpt, model_cfg: ModelConfig, seq: int, micro: int, sp: int) -> int:
    tokens = torch.randint(0, model_cfg.vocab_size, (micro, seq))
    positions = torch.arange(seq).expand(micro, seq)
    if not gpt.pre_process:  # a later stage gets the previous stage's hidden states
        hidden = torch.randn(seq // sp, micro, model_cfg.hidden_size, dtype=torch.bfloat16)
        gpt.set_input_tensor(hidden.requires_grad_())
    params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:  # weights are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        gpt(tokens, positions, None, labels=tokens if gpt.post_process else None)
    return sum(saved.values())


RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full uniform": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 2,
    },
    "full block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
}


@pytest.mark.parametrize(
    "tp, pp, sp, recompute",
    [
        (1, 1, False, list(RECOMPUTE)),
        (1, 2, False, ["none", "full uniform"]),
        (2, 1, True, ["none", "selective"]),
        (2, 1, False, ["none"]),
    ],
)
def test_activation_bytes_are_within_10_percent_of_what_autograd_saves(tp, pp, sp, recompute):
    seq, micro = 64, 2
    settings = [{"tp": tp, "pp": pp, "sp": sp, "model": RECOMPUTE[name]} for name in recompute]
    results = run_on_ranks(_activations_on_rank, tp * pp, settings, seq, micro)
    layout = PlanLayout(tp, pp, 1, sequence_parallel=sp)
    for rank, measured in enumerate(results):
        stage = rank // tp  # ranks are TP-major inside a stage
        for name, got in zip(recompute, measured, strict=True):
            setting = RECOMPUTE[name]
            plan_recompute = tuple(setting.get(k) for k in ("recompute_granularity", "recompute_method"))
            planned = stage_activation_bytes(
                ModelConfig(**TINY),
                seq,
                micro,
                layout,
                True,
                stage,
                (*plan_recompute, setting.get("recompute_num_layers")),
            )
            assert abs(planned - got) <= 0.1 * got, (name, stage, planned, got)


def test_interleaved_pipeline_holds_the_papers_in_flight_activations():
    # Narayanan et al. 2021: the first stage of the interleaved schedule holds PP * (1 + (PP-1)/(PP*VPP))
    # stages' worth of micro-batches; 1F1B holds PP (and never more micro-batches than the batch has).
    for pp, vpp in ((4, 2), (8, 4), (2, 2)):
        layout = PlanLayout(pipeline_parallel=pp, virtual_pipeline=vpp)
        assert micro_batches_in_flight(layout, 0, 64) == pytest.approx(pp * (1 + (pp - 1) / (pp * vpp)))
    assert micro_batches_in_flight(PlanLayout(pipeline_parallel=4), 0, 64) == 4
    assert micro_batches_in_flight(PlanLayout(pipeline_parallel=4), 3, 64) == 1
    assert micro_batches_in_flight(PlanLayout(pipeline_parallel=8), 0, 2) == 2


def test_sequence_parallel_recompute_and_context_parallel_shrink_the_activations():
    model = ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, vocab_size=32000
    )
    work = Workload(4096, 1, 1024)
    plain = plan_memory(model, PlanLayout(2, 1, 4), Precision(), work).activations
    sp = plan_memory(model, PlanLayout(2, 1, 4, sequence_parallel=True), Precision(), work).activations
    cp = plan_memory(model, PlanLayout(2, 1, 2, context_parallel=2), Precision(), work).activations
    full = dataclasses.replace(work, recompute=("full", "uniform", 1))
    recomputed = plan_memory(model, PlanLayout(2, 1, 4), Precision(), full).activations
    assert sp < plain and recomputed < plain / 10
    assert cp == pytest.approx(plain / 2, rel=0.02)
