"""DeepSeek-V2(-Lite) and DeepSeek-V3: Multi-Latent Attention, fine-grained + shared experts, first-k-dense.

Megatron-Core's ``MLASelfAttention`` (local spec, ``qk_layernorm`` = the latent norms) holds the same
matrices as HF's ``DeepseekV2Attention``/``DeepseekV3Attention``, unpermuted: both lay the rotary part
of ``q_b_proj``/``kv_a_proj_with_mqa`` out in interleaved pairs, which HF rotates as complex pairs (V2)
or de-interleaves (V3 ``rope_interleave``) and Megatron-Core de-interleaves (``_apply_rotary_pos_emb_bshd``
with ``multi_latent_attention``); q.k is the same sum either way. Routers:

* V2: softmax over all experts, greedy top-k, no renormalization, times ``routed_scaling_factor``
  = ``moe_router_pre_softmax`` + ``moe_router_topk_scaling_factor``; ``group_limited_greedy`` ranks
  groups by their best expert, Megatron-Core by the sum of its top ``topk // group_topk``.
* V3: sigmoid, ``e_score_correction_bias`` (= ``router.expert_bias``, aux-loss-free balancing) used for
  the choice only, groups ranked by their top-2 sum, weights renormalized (Megatron-Core always
  renormalizes sigmoid top-k > 1), times ``routed_scaling_factor``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert.families.base import Family, llama_like_fields, read_llama_like, transformers_config
from tools.convert.families.llama import DOWN, GATE_UP, O_PROJ, H, L, decoder
from tools.convert.families.moe import routed_experts, router
from tools.convert.mapping import ColumnParallel, Entry, GatedMLP, Replicated, RowParallel

A, HA = f"{L}self_attention.", f"{H}self_attn."
# Down projections are ColumnParallelLinear in the local spec (outputs gathered over TP before the norm).
Q_PROJ = ColumnParallel(f"{A}linear_q_proj.weight", (f"{HA}q_proj.weight",))  # q_lora_rank None (V2-Lite)
Q_DOWN = ColumnParallel(f"{A}linear_q_down_proj.weight", (f"{HA}q_a_proj.weight",))
Q_NORM = Replicated(f"{A}q_layernorm.weight", (f"{HA}q_a_layernorm.weight",))
Q_UP = ColumnParallel(f"{A}linear_q_up_proj.weight", (f"{HA}q_b_proj.weight",))  # whole heads per rank
KV_DOWN = ColumnParallel(f"{A}linear_kv_down_proj.weight", (f"{HA}kv_a_proj_with_mqa.weight",))
KV_NORM = Replicated(f"{A}kv_layernorm.weight", (f"{HA}kv_a_layernorm.weight",))
KV_UP = ColumnParallel(f"{A}linear_kv_up_proj.weight", (f"{HA}kv_b_proj.weight",))  # [k_nope; v] per head
EXPERT_BIAS = Replicated(f"{L}mlp.router.expert_bias", (f"{H}mlp.gate.e_score_correction_bias",))
SHARED_EXPERTS = (
    GatedMLP(
        f"{L}mlp.shared_experts.linear_fc1.weight",
        (f"{H}mlp.shared_experts.gate_proj.weight", f"{H}mlp.shared_experts.up_proj.weight"),
    ),
    RowParallel(f"{L}mlp.shared_experts.linear_fc2.weight", (f"{H}mlp.shared_experts.down_proj.weight",)),
)
LATENT_NORM_EPS = 1e-6  # HF's q_a_layernorm/kv_a_layernorm hard-code it; Megatron-Core uses norm_epsilon
YARN_KEYS = ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def table(cfg: ModelConfig) -> list[Entry]:
    query = [Q_PROJ] if cfg.q_lora_rank is None else [Q_DOWN, Q_UP, Q_NORM]
    attention = [*query, KV_DOWN, KV_NORM, KV_UP, O_PROJ]
    bias = [EXPERT_BIAS] if cfg.moe_router_enable_expert_bias else []
    shared = list(SHARED_EXPERTS) if cfg.moe_shared_expert_intermediate_size else []
    experts = routed_experts("mlp", "gate_proj", "up_proj", "down_proj")
    return decoder(cfg, attention, mlp=(GATE_UP, DOWN, router("mlp"), *bias, *experts, *shared))


def _rope(config: dict) -> dict[str, Any]:
    """MLA's RoPE fields: plain, or YaRN as Megatron-Core's ``YarnRotaryEmbedding`` computes it."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rotary_base": theta, "rope_type": "rope"}
    if kind != "yarn":
        raise ConfigError(f"DeepSeek rope scaling {kind!r} is not supported (MLA implements rope and yarn)")
    if scaling.get("attention_factor") is not None or scaling.get("truncate", True) is not True:
        raise ConfigError("yarn attention_factor/truncate=false are not supported by Megatron-Core's YaRN")
    if bool(scaling.get("mscale")) != bool(scaling.get("mscale_all_dim")):
        # HF then falls back to mscale=1 for the rotary part but keeps mscale_all_dim in the softmax scale.
        raise ConfigError("yarn needs both mscale and mscale_all_dim, or neither")
    yarn = {key: scaling[key] for key in YARN_KEYS if scaling.get(key) is not None}
    yarn.setdefault("mscale", 1.0)
    return {
        "rotary_base": theta,
        "rope_type": "yarn",
        "rotary_scaling_factor": float(scaling["factor"]),
        **yarn,
    }


def _rope_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_type == "rope":
        return {"rope_theta": cfg.rotary_base, "rope_scaling": None}
    yarn = {key: getattr(cfg, key) for key in YARN_KEYS}
    omitted = {"beta_fast": 32.0, "beta_slow": 1.0}  # HF's defaults
    if not cfg.mscale_all_dim:
        omitted |= {"mscale": 1.0, "mscale_all_dim": 0.0}
    yarn = {key: value for key, value in yarn.items() if omitted.get(key) != value}
    scaling = {"rope_type": "yarn", "factor": cfg.rotary_scaling_factor, **yarn}
    return {"rope_theta": cfg.rotary_base, "rope_scaling": scaling}


def _mla(config: dict) -> dict[str, Any]:
    if config.get("attention_bias"):
        raise ConfigError("DeepSeek attention_bias=true is not supported (Megatron-Core's MLA has no biases)")
    if float(config.get("rms_norm_eps", LATENT_NORM_EPS)) != LATENT_NORM_EPS:
        raise ConfigError(
            f"DeepSeek rms_norm_eps must be {LATENT_NORM_EPS:g}: HF's latent norms hard-code it and "
            "Megatron-Core uses one norm epsilon"
        )
    return dict(
        multi_latent_attention=True,
        qk_layernorm=True,  # MLA: the q_a / kv_a latent norms
        num_query_groups=None,
        kv_channels=None,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_head_dim=config["qk_nope_head_dim"],
        qk_pos_emb_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        **_rope(config),
    )


def _experts(config: dict) -> dict[str, Any]:
    """Fine-grained routed experts, ``n_shared_experts`` shared ones, the first k layers dense."""
    layers, first_dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
    if not 0 <= first_dense < layers or config.get("moe_layer_freq", 1) != 1:
        raise ConfigError(
            f"DeepSeek first_k_dense_replace {first_dense} (moe_layer_freq 1) leaves no MoE layer"
        )
    pattern = [int(i >= first_dense) for i in range(layers)]
    width, shared = config["moe_intermediate_size"], config.get("n_shared_experts") or 0
    scaling = float(config.get("routed_scaling_factor", 1.0))
    return dict(
        num_moe_experts=config["n_routed_experts"],
        moe_router_topk=config["num_experts_per_tok"],
        moe_ffn_hidden_size=width,
        moe_shared_expert_intermediate_size=shared * width or None,
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_router_topk_scaling_factor=None if scaling == 1.0 else scaling,
    )


def _groups(config: dict, group_score_topk: int, family: str) -> dict[str, Any]:
    """Group-limited routing; Megatron-Core ranks a group by the sum of its top ``topk // group_topk``."""
    groups, group_topk, topk = (
        config.get("n_group") or 1,
        config.get("topk_group") or 1,
        config["num_experts_per_tok"],
    )
    if groups == 1:
        return {}
    if topk // group_topk != group_score_topk:
        raise ConfigError(
            f"{family} ranks expert groups by their top-{group_score_topk} scores; Megatron-Core by the top "
            f"num_experts_per_tok // topk_group = {topk // group_topk}: not the same routing"
        )
    return {"moe_router_num_groups": groups, "moe_router_group_topk": group_topk}


def read_v2(config: dict) -> ModelConfig:
    if config.get("norm_topk_prob"):
        raise ConfigError(
            "DeepSeek-V2 norm_topk_prob=true: transformers' DeepseekV2 ignores it; not supported"
        )
    group_limited = config.get("topk_method", "greedy") == "group_limited_greedy"
    if config.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"DeepSeek-V2 topk_method {config['topk_method']!r} is not supported")
    router_fields = dict(
        moe_router_pre_softmax=True, **(_groups(config, 1, "DeepSeek-V2") if group_limited else {})
    )
    return _read(config, router_fields)


def read_v3(config: dict) -> ModelConfig:
    if not config.get("rope_interleave", True):
        raise ConfigError(
            "DeepSeek-V3 rope_interleave=false is not supported (MLA rotates interleaved pairs)"
        )
    if bool(config.get("norm_topk_prob", True)) != (config["num_experts_per_tok"] > 1):
        raise ConfigError("DeepSeek-V3 needs norm_topk_prob=true exactly when top-k > 1 (as Megatron-Core)")
    router_fields = dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        **_groups(config, 2, "DeepSeek-V3"),
    )
    return _read(config, router_fields)


def _read(config: dict, router_fields: dict[str, Any]) -> ModelConfig:
    if config.get("quantization_config"):  # DeepSeek-V3's release: FP8 blocks + weight_scale_inv tensors
        raise ConfigError("quantized DeepSeek checkpoints (quantization_config) are not supported: use bf16")
    plain = {**config, "rope_scaling": None, "rope_parameters": None, "head_dim": None}
    cfg = read_llama_like(plain, **_mla(config))
    return dataclasses.replace(cfg, **_experts(config), **router_fields)


def _require(cfg: ModelConfig, family: str, wanted: dict[str, Any]) -> None:
    """The HF family computes ``cfg``: MLA with latent norms, first-k-dense, no shared-expert gate."""
    pattern = cfg.moe_layer_pattern()
    first_dense = pattern.index(1) if 1 in pattern else len(pattern)
    checks = {
        "multi_latent_attention": (cfg.multi_latent_attention, True),
        "qk_layernorm": (cfg.qk_layernorm, True),
        "norm_epsilon": (cfg.norm_epsilon, LATENT_NORM_EPS),
        "moe_shared_expert_gate": (cfg.moe_shared_expert_gate, False),
        "moe_layer_freq (dense layers first)": (
            pattern,
            [int(i >= first_dense) for i in range(len(pattern))],
        ),
        **{name: (getattr(cfg, name), value) for name, value in wanted.items()},
    }
    for name, (value, needed) in checks.items():
        if value != needed:
            raise ConfigError(f"{family} needs {name}={needed!r}; this model has {value!r}")


def _write(cfg: ModelConfig, router_fields: dict[str, Any]) -> dict[str, Any]:
    width = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    shared = cfg.moe_shared_expert_intermediate_size or 0
    if shared % width:
        raise ConfigError(
            f"shared experts {shared} wide are no whole number of {width}-wide DeepSeek experts"
        )
    # num_key_value_heads = heads (llama_like_fields): HF's MLA repeats each k/v head heads // kv_heads times
    fields = llama_like_fields(cfg) | _rope_config(cfg)
    return (
        fields
        | router_fields
        | dict(
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_head_dim,
            qk_rope_head_dim=cfg.qk_pos_emb_head_dim,
            v_head_dim=cfg.v_head_dim,
            n_routed_experts=cfg.num_moe_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            moe_intermediate_size=width,
            n_shared_experts=shared // width,
            first_k_dense_replace=cfg.moe_layer_pattern().index(1),
            routed_scaling_factor=cfg.moe_router_topk_scaling_factor or 1.0,
        )
    )


def write_v2(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    wanted = {"moe_router_score_function": "softmax", "moe_router_pre_softmax": True}
    _require(cfg, "DeepSeek-V2", wanted | {"moe_router_enable_expert_bias": False})
    if cfg.moe_router_num_groups and cfg.moe_router_topk // cfg.moe_router_group_topk != 1:
        raise ConfigError(
            "DeepSeek-V2 ranks expert groups by their best expert: needs topk // group_topk == 1"
        )
    method = "group_limited_greedy" if cfg.moe_router_num_groups else "greedy"
    groups = {"n_group": cfg.moe_router_num_groups, "topk_group": cfg.moe_router_group_topk}
    fields = _write(cfg, {"topk_method": method, "norm_topk_prob": False, **groups})
    return transformers_config("deepseek_v2", "DeepseekV2ForCausalLM", fields, base, dtype)


def write_v3(cfg: ModelConfig, base: dict, dtype: torch.dtype) -> dict:
    wanted = {"moe_router_score_function": "sigmoid", "moe_router_pre_softmax": False}
    _require(cfg, "DeepSeek-V3", wanted | {"moe_router_enable_expert_bias": True})
    if cfg.moe_router_num_groups and cfg.moe_router_topk // cfg.moe_router_group_topk != 2:
        raise ConfigError("DeepSeek-V3 ranks expert groups by their top-2 sum: needs topk // group_topk == 2")
    groups = {"n_group": cfg.moe_router_num_groups or 1, "topk_group": cfg.moe_router_group_topk or 1}
    fields = _write(cfg, {"norm_topk_prob": cfg.moe_router_topk > 1, "rope_interleave": True, **groups})
    return transformers_config("deepseek_v3", "DeepseekV3ForCausalLM", fields, base, dtype)


DEEPSEEK_V2 = Family("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", table, read_v2, write_v2)
DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", table, read_v3, write_v3)
