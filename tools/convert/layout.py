"""Megatron-Core's side of a conversion: parameter names and shapes, pipeline stages, layer specs.

Pure functions of a :class:`ModelConfig` and a TP/PP layout. The parameter
names of either layer spec belong to ``megatron_patches.formats.param_names``
(re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patches.errors import ConfigError
from megatron_patches.formats.checkpoint import virtual_stage
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.formats.param_names import (  # noqa: F401  (re-exported: the converter's names)
    EMBEDDING,
    FINAL_NORM,
    OUTPUT,
    SPECS,
    TE_RENAMES,
    extra_state_keys,
    from_spec,
    layer_param,
    renumber_expert,
    spec_name,
    split_expert_name,
    split_layer_name,
    to_spec,
)
from megatron_patches.parallel import Layout, validate_layout
from tools.convert.mapping import expert_place, global_expert

LOCAL_EXPERTS = "mlp.experts.local_experts."


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole (TP=1, PP=1) model, vocabulary unpadded, in model order."""
    h, heads, groups, d = cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim
    qkv_rows = (heads + 2 * groups) * d
    fc1_rows = 2 * cfg.ffn_hidden_size if cfg.swiglu else cfg.ffn_hidden_size
    per_layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv_rows, h)}
    if cfg.add_qkv_bias:
        per_layer["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if cfg.qk_layernorm:
        per_layer["self_attention.q_layernorm.weight"] = (d,)
        per_layer["self_attention.k_layernorm.weight"] = (d,)
    per_layer["self_attention.linear_proj.weight"] = (h, heads * d)
    per_layer["pre_mlp_layernorm.weight"] = (h,)
    dense = {"mlp.linear_fc1.weight": (fc1_rows, h), "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size)}
    if cfg.multi_latent_attention:
        per_layer = {"input_layernorm.weight": (h,), **mla_shapes(cfg), "pre_mlp_layernorm.weight": (h,)}
    mlps = (dense, moe_shapes(cfg))
    shapes = {EMBEDDING: (cfg.vocab_size, h)}
    for layer, is_moe in enumerate(cfg.moe_layer_pattern()):
        layer_shapes = {**per_layer, **mlps[is_moe]}
        shapes.update({layer_param(layer, key): shape for key, shape in layer_shapes.items()})
    shapes[FINAL_NORM] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes[OUTPUT] = (cfg.vocab_size, h)
    return shapes


def mla_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Multi-Latent Attention's parameters (local spec; ``MLASelfAttention``'s order), layer-relative."""
    h, heads, latent = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    q_rows = heads * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)
    attn = "self_attention."
    shapes = {f"{attn}linear_proj.weight": (h, heads * cfg.v_head_dim)}
    if cfg.q_lora_rank is None:
        shapes[f"{attn}linear_q_proj.weight"] = (q_rows, h)
    else:
        shapes[f"{attn}linear_q_down_proj.weight"] = (cfg.q_lora_rank, h)
        shapes[f"{attn}linear_q_up_proj.weight"] = (q_rows, cfg.q_lora_rank)
    shapes[f"{attn}linear_kv_down_proj.weight"] = (latent + cfg.qk_pos_emb_head_dim, h)
    shapes[f"{attn}linear_kv_up_proj.weight"] = (heads * (cfg.qk_head_dim + cfg.v_head_dim), latent)
    if cfg.qk_layernorm:
        if cfg.q_lora_rank is not None:
            shapes[f"{attn}q_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes[f"{attn}kv_layernorm.weight"] = (latent,)
    return shapes


def moe_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """An MoE layer's MLP parameters (layer-relative names, every routed expert by its global number)."""
    if not cfg.num_moe_experts:
        return {}
    h, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    shapes = {"mlp.router.weight": (cfg.num_moe_experts, h)}
    if cfg.moe_router_enable_expert_bias:
        shapes["mlp.router.expert_bias"] = (cfg.num_moe_experts,)
    for expert in range(cfg.num_moe_experts):
        shapes[f"{LOCAL_EXPERTS}{expert}.linear_fc1.weight"] = (2 * ffn, h)
        shapes[f"{LOCAL_EXPERTS}{expert}.linear_fc2.weight"] = (h, ffn)
    shared = cfg.moe_shared_expert_intermediate_size
    if shared:
        if cfg.moe_shared_expert_gate:
            shapes["mlp.shared_experts.gate_weight"] = (1, h)
        shapes["mlp.shared_experts.linear_fc1.weight"] = (2 * shared, h)
        shapes["mlp.shared_experts.linear_fc2.weight"] = (h, shared)
    return shapes


def ep_local_name(name: str, cfg: ModelConfig, ep: int, ep_rank: int) -> str | None:
    """``name`` as EP rank ``ep_rank`` holds it (its expert renumbered), None if another rank holds it."""
    expert = split_expert_name(name)
    if expert is None:
        return name
    owner, local = expert_place(expert[1], cfg.num_moe_experts, ep)
    return renumber_expert(name, local) if owner == ep_rank else None


def ep_global_name(name: str, cfg: ModelConfig, ep: int, ep_rank: int) -> str:
    """Inverse of :func:`ep_local_name`."""
    expert = split_expert_name(name)
    if expert is None:
        return name
    return renumber_expert(name, global_expert(expert[1], ep_rank, cfg.num_moe_experts, ep))


def ep_params(
    params: list[tuple[str, str]], cfg: ModelConfig, ep: int, ep_rank: int
) -> list[tuple[str, str]]:
    """(global name, name on this EP rank) of the ``params`` (from :func:`stage_params`) that rank holds."""
    held = [(name, ep_local_name(local, cfg, ep, ep_rank)) for name, local in params]
    return [(name, local) for name, local in held if local is not None]


def check_supported(cfg: ModelConfig) -> None:
    """The architectures this converter maps: Llama-style RMSNorm + SwiGLU + RoPE, no linear biases."""
    unsupported = {
        "normalization": (cfg.normalization, "RMSNorm"),
        "swiglu": (cfg.swiglu, True),
        "add_bias_linear": (cfg.add_bias_linear, False),
        "position_embedding_type": (cfg.position_embedding_type, "rope"),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConfigError(
                f"model config {name}={value!r} is not supported by tools.convert (needs {wanted!r})"
            )


def check_expert_layout(cfg: ModelConfig, tp: int, ep: int, etp: int) -> None:
    """EP splits whole routed experts; each expert's FFN splits over ETP: TP (the default) or 1."""
    if ep < 1:
        raise ConfigError(f"EP must be >= 1, got {ep}")
    if etp not in (1, tp):
        raise ConfigError(f"expert tensor parallel size (ETP) must be 1 or TP ({tp}), got {etp}")
    if not cfg.num_moe_experts:
        if ep > 1:
            raise ConfigError(f"EP={ep} needs an MoE model; this one is dense (num_moe_experts unset)")
        return
    if cfg.num_moe_experts % ep:
        raise ConfigError(f"num_moe_experts ({cfg.num_moe_experts}) is not divisible by EP ({ep})")
    widths = {
        "moe_ffn_hidden_size": (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size, "ETP", etp),
        "moe_shared_expert_intermediate_size": (cfg.moe_shared_expert_intermediate_size or 0, "TP", tp),
    }
    for name, (width, by_name, by) in widths.items():
        if width % by:
            raise ConfigError(f"{name} ({width}) is not divisible by {by_name} ({by})")


def tp_split(name: str, tp: int, etp: int, tp_rank: int) -> tuple[int, int]:
    """(parts, part) of parameter ``name`` that TP rank ``tp_rank`` holds: routed experts split over
    ETP, which is TP or 1 (then every TP rank holds the whole expert), all else over TP."""
    if etp == tp or split_expert_name(name) is None:
        return tp, tp_rank
    return 1, 0


def stage_layer_counts(
    num_layers: int, pp: int, first: int | None = None, last: int | None = None
) -> list[int]:
    """Layers per pipeline stage, Megatron-Core's rule for uneven first/last stages."""
    if pp < 1:
        raise ConfigError(f"PP must be >= 1, got {pp}")
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(
                f"num_layers ({num_layers}) is not divisible by PP ({pp}); give "
                "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"
            )
        return [num_layers // pp] * pp
    if pp == 1:
        raise ConfigError("uneven pipeline stages need PP > 1")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    too_small = any(n is not None and n < 1 for n in (first, last))
    if too_small or rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest < middle)):
        raise ConfigError(
            f"cannot place {num_layers} layers on {pp} stages with first={first} last={last}: "
            f"the {middle} remaining stages would share {rest} layers"
        )
    inner = [rest // middle] * middle if middle else []
    return [*([first] if first is not None else []), *inner, *([last] if last is not None else [])]


@dataclass(frozen=True)
class Pipeline:
    """Which global layers each pipeline stage owns."""

    counts: tuple[int, ...]  # layers per stage; with VPP per virtual stage, in model order
    chunks: int = 1  # model chunks per PP rank (virtual pipeline stages); rank files hold model0, ...

    @property
    def size(self) -> int:
        return len(self.counts)

    @property
    def ranks(self) -> int:
        """Pipeline ranks (rank files along PP)."""
        return self.size // self.chunks

    def stages_of(self, pp_rank: int) -> list[int]:
        """The (virtual) stages PP rank ``pp_rank`` holds, by chunk: ``ckpt_format.virtual_stage``."""
        return [virtual_stage(pp_rank, chunk, self.ranks) for chunk in range(self.chunks)]

    def offset(self, stage: int) -> int:
        return sum(self.counts[:stage])

    def stage_of(self, layer: int) -> tuple[int, int]:
        """Global layer -> (stage, layer number local to that stage)."""
        for stage, count in enumerate(self.counts):
            if layer < count:
                return stage, layer
            layer -= count
        raise ConfigError(f"layer {layer + sum(self.counts)} is beyond the {sum(self.counts)} layers")


def plan_layout(
    cfg: ModelConfig,
    tp: int,
    pp: int,
    first: int | None = None,
    last: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
) -> Pipeline:
    """Validate a TP/PP/EP(/ETP)(/VPP) layout for ``cfg`` (before anything is written); return its pipeline.

    With ``vpp`` the pipeline has PP x VPP even virtual stages (Megatron-Core's interleaved split).
    """
    check_supported(cfg)
    validate_layout(Layout(tp, tp, 1), cfg)
    check_expert_layout(cfg, tp, ep, tp if etp is None else etp)
    if vpp is None:
        return Pipeline(tuple(stage_layer_counts(cfg.num_layers, pp, first, last)))
    if first is not None or last is not None:
        raise ConfigError(
            "--vpp splits the layers evenly: it cannot be combined with uneven first/last stages"
        )
    validate_layout(Layout(pp, 1, pp, vpp), cfg)  # PP >= 2, num_layers divisible by PP x VPP
    return Pipeline(tuple(stage_layer_counts(cfg.num_layers, pp * vpp)), chunks=vpp)


def stage_params(names: list[str], pipeline: Pipeline, stage: int) -> list[tuple[str, str]]:
    """(global name, name local to ``stage``) of the canonical params that stage holds."""
    out = []
    last = pipeline.size - 1
    for name in names:
        layer = split_layer_name(name)
        if layer is not None:
            owner, local = pipeline.stage_of(layer[0])
            if owner == stage:
                out.append((name, layer_param(local, layer[1])))
        elif (name == EMBEDDING and stage == 0) or (name in (FINAL_NORM, OUTPUT) and stage == last):
            out.append((name, name))
    return out
