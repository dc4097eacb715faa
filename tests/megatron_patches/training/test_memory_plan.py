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
from megatron_patches.training.memory_plan import PlanLayout, Precision, Workload, plan_memory, static_bytes
from megatron_patches.training.memory_plan_activations import micro_batches_in_flight, stage_activation_bytes
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
    owned, optimizer = _built_static_bytes(builder.build(cfg))
    return ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), owned, optimizer


def _built_static_bytes(objects) -> tuple[int, int]:
    """(DDP buffers' bytes, optimizer state's bytes) of built training objects, after one step."""
    objects.optimizer.step()  # Adam's m and v exist from the first step on
    buffers = objects.model.buffers + objects.model.expert_parallel_buffers  # MoE: the experts' own
    model_tensors = [t for buffer in buffers for t in (buffer.param_data, buffer.grad_data)]
    optimizer_tensors = []
    for optimizer in objects.optimizer.chained_optimizers:
        inner = optimizer.optimizer
        optimizer_tensors += [p for group in inner.param_groups for p in group["params"]]
        for state in inner.state.values():  # 0-dim "step" counters are bookkeeping, not per-param memory
            optimizer_tensors += [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    owned = _storages_bytes(model_tensors)
    return owned, _storages_bytes(model_tensors + optimizer_tensors) - owned


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
    from megatron_patches.training.model import build_model_chunks_for_this_rank

    measured = []
    for setting in layouts:
        model_cfg = ModelConfig(**TINY, **setting["model"])
        tp, pp, vpp = setting["tp"], setting["pp"], setting.get("vpp")
        if not ps.model_parallel_is_initialized():
            layout = parallel.Layout(torch.distributed.get_world_size(), tp, pp, vpp)
            parallel.initialize(layout, 1234, model_cfg)
        chunks = build_model_chunks_for_this_rank(model_cfg, torch.bfloat16, sequence_parallel=setting["sp"])
        sp = tp if setting["sp"] else 1
        measured.append(sum(_saved_bytes(gpt, model_cfg, seq, micro, sp) for gpt in chunks))
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


def test_interleaved_pipeline_activation_bytes_are_within_10_percent_of_what_autograd_saves():
    # PP=2 x VPP=2: each rank holds two chunks of one layer; rank 0's first embeds, rank 1's last has the loss
    seq, micro = 64, 2
    names = ["none", "full block"]  # recompute_num_layers 1: the chunk's one layer
    settings = [{"tp": 1, "pp": 2, "vpp": 2, "sp": False, "model": RECOMPUTE[name]} for name in names]
    results = run_on_ranks(_activations_on_rank, 2, settings, seq, micro)
    layout = PlanLayout(1, 2, 1, virtual_pipeline=2)
    for stage, measured in enumerate(results):
        for name, got in zip(names, measured, strict=True):
            setting = RECOMPUTE[name]
            recompute = tuple(setting.get(k) for k in ("recompute_granularity", "recompute_method"))
            recompute += (setting.get("recompute_num_layers"),)
            planned = stage_activation_bytes(ModelConfig(**TINY), seq, micro, layout, True, stage, recompute)
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


def _moe_static_on_rank(overrides: list[str]) -> tuple[int, int, int, int, int]:
    """(stage, DP rank, expert-DP rank, buffer bytes, optimizer bytes) at TP=2 x EP=2 (ETP=1) on 4 ranks."""
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training import builder
    from megatron_patches.training.config import load_config

    cfg = load_config(None, [f"model.{k}={v}" for k, v in TINY.items()] + overrides)
    layout = parallel.Layout(4, 2, 1, expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    parallel.initialize(layout, cfg.seed, cfg.model)
    owned, optimizer = _built_static_bytes(builder.build(cfg))
    ranks = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_expert_data_parallel_rank(),
    )
    return (*ranks, owned, optimizer)


def test_moe_static_bytes_equal_the_tensors_on_every_rank():
    # a dense first layer, then MoE layers with 6 experts (3 per EP rank) and a gated shared expert;
    # the experts' buffer is sharded over expert-DP 2 (TP 2 x DP 2 / EP 2), the rest over DP 2
    moe = dict(
        num_moe_experts=6,
        moe_ffn_hidden_size=40,
        moe_shared_expert_intermediate_size=60,
        moe_shared_expert_gate=True,
        moe_layer_freq=[0, 1, 1, 1],
    )
    overrides = [f"model.{k}={v}" for k, v in moe.items()]
    overrides += ["train.bf16=true", "ddp.overlap_grad_reduce=true", "ddp.bucket_size=3000"]
    results = run_on_ranks(_moe_static_on_rank, 4, overrides)
    model = ModelConfig(**TINY, **moe)
    layout = PlanLayout(2, 1, 2, expert_parallel=2, expert_tensor_parallel=1)
    precision = Precision(bf16=True, bucket_size=3000)
    for stage, dp_rank, expert_dp_rank, buffers, optimizer in results:
        weights, grads, planned_optimizer = static_bytes(
            model, layout, precision, stage, dp_rank, expert_dp_rank
        )
        assert (weights + grads, planned_optimizer) == (buffers, optimizer), (dp_rank, expert_dp_rank)


def test_moe_activation_bytes_are_within_10_percent_of_what_autograd_saves():
    # TP 2 with sequence parallel (MoE needs it), the experts split over ETP 2: a dense first layer and a
    # shared expert, then all-MoE with wider experts; routing is not balanced, the plan assumes it is
    seq, micro = 64, 2
    models = [
        dict(
            num_moe_experts=8,
            moe_ffn_hidden_size=24,
            moe_router_topk=4,
            moe_shared_expert_intermediate_size=48,
        )
        | {"moe_layer_freq": [0, 1, 1, 1]},
        dict(num_moe_experts=4, moe_ffn_hidden_size=80, moe_router_topk=2),
    ]
    settings = [{"tp": 2, "pp": 1, "sp": True, "model": model} for model in models]
    layout = PlanLayout(2, 1, 1, sequence_parallel=True, expert_tensor_parallel=2)
    for measured in run_on_ranks(_activations_on_rank, 2, settings, seq, micro):
        for model, got in zip(models, measured, strict=True):
            planned = stage_activation_bytes(ModelConfig(**TINY, **model), seq, micro, layout, True, 0)
            assert abs(planned - got) <= 0.1 * got, (model, planned, got)


MLA = dict(  # num_query_groups is unused with MLA
    multi_latent_attention=True,
    qk_layernorm=True,
    kv_lora_rank=16,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=6,
)


def _mla_static_on_rank(variants: list[list[str]]) -> list[tuple[int, int]]:
    """(buffer bytes, optimizer bytes) of each MLA variant built at TP=2 on 2 ranks."""
    from megatron_patches import parallel
    from megatron_patches.training import builder
    from megatron_patches.training.config import load_config

    base = [f"model.{k}={v}" for k, v in {**TINY, **MLA}.items()]
    configs = [load_config(None, base + overrides) for overrides in variants]
    parallel.initialize(parallel.Layout(2, 2, 1), configs[0].seed, configs[0].model)
    return [_built_static_bytes(builder.build(cfg)) for cfg in configs]


def test_multi_latent_attention_static_bytes_equal_the_tensors_on_every_rank():
    # with a query latent (DeepSeek-V3) and without (V2-Lite); the down projections split over TP 2
    variants = {24: ["model.q_lora_rank=24", "train.bf16=true"], None: ["train.bf16=false"]}
    results = run_on_ranks(_mla_static_on_rank, 2, list(variants.values()))
    for rank_results in results:
        for (q_lora_rank, overrides), measured in zip(variants.items(), rank_results, strict=True):
            model = ModelConfig(**{**TINY, **MLA}, q_lora_rank=q_lora_rank)
            weights, grads, optimizer = static_bytes(
                model, PlanLayout(2, 1, 1), Precision(bf16="train.bf16=true" in overrides), stage=0
            )
            assert (weights + grads, optimizer) == measured, q_lora_rank


def test_multi_latent_attention_activation_bytes_are_within_10_percent_of_what_autograd_saves():
    # TP 2 with sequence parallel; values as wide as queries/keys (8 + 4): CPU's fused SDPA needs that (as
    # GPU kernels do not), otherwise it keeps the s x s scores
    seq, micro = 64, 2
    shapes = dict(kv_lora_rank=32, v_head_dim=12)
    models = [{**MLA, **shapes, "q_lora_rank": 48}, {**MLA, **shapes, "q_lora_rank": None}]
    settings = [{"tp": 2, "pp": 1, "sp": True, "model": model} for model in models]
    layout = PlanLayout(2, 1, 1, sequence_parallel=True)
    for measured in run_on_ranks(_activations_on_rank, 2, settings, seq, micro):
        for model, got in zip(models, measured, strict=True):
            planned = stage_activation_bytes(ModelConfig(**TINY, **model), seq, micro, layout, True, 0)
            assert abs(planned - got) <= 0.1 * got, (model["q_lora_rank"], planned, got)
