"""The model architecture config: Megatron-LM's argument names, and nothing that imports Megatron.

``ModelConfig`` is the architecture contract shared by the trainer and
``tools/convert``: a checkpoint stores ``asdict(config)`` so any TP/PP layout
can rebuild the model. Building the ``GPTModel`` (and the pinned-API check
that needs Megatron-Core) lives in ``megatron_patches.training.model``; this
module stays importable without Megatron-Core so the converter's pure mapping
tables load quickly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_patches.errors import ConfigError

# "auto": Transformer Engine's spec where it imports and CUDA is present, else the local spec.
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
# Core attention of the local spec: Megatron-Core's DotProductAttention ("unfused"),
# or torch's fused scaled_dot_product_attention ("sdpa"; "auto" picks it).
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused")
# Fields that choose kernels, not weights: a checkpoint loads whatever they are.
RUNTIME_ONLY_FIELDS = (
    "transformer_impl",
    "attention_backend",
    "hidden_dropout",
    "attention_dropout",
    "init_method_std",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    # MoE training knobs: they change routing and losses, never the weights a checkpoint holds.
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
    "moe_router_bias_update_rate",
    "moe_token_dispatcher_type",
)
# Activation recompute (Megatron-LM's names): "full" recomputes whole layers in backward
# (recompute_method uniform|block, recompute_num_layers), "selective" only core attention.
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# Megatron-Core 0.16.1's values (TransformerConfig / TopKRouter); "flex" needs DeepEP (GPU).
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
MOE_TOKEN_DISPATCHERS = ("allgather", "alltoall")
MLA_ROPE_TYPES = ("rope", "yarn")  # MLATransformerConfig.rope_type
# MLATransformerConfig's own fields, under the same names in ModelConfig and Megatron-LM's arguments.
MLA_FIELDS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "rope_type",
    "rotary_scaling_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


@dataclass
class ModelConfig:
    """A Llama-style decoder; ``validate`` refuses shapes Megatron-Core cannot build."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention (groups == heads)
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 256  # tokenizer vocabulary; the embedding is padded past it
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    use_rope_scaling: bool = False  # Llama-3.1 style frequency scaling
    rope_scaling_factor: float = 8.0
    # Linear RoPE scaling (HF rope_type "linear", e.g. DeepSeek-Coder): positions divided by this factor.
    rotary_seq_len_interpolation_factor: float | None = None
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: str = "local"
    attention_backend: str = "auto"
    recompute_granularity: str | None = None  # None | full | selective
    recompute_method: str | None = None  # uniform | block (full only)
    recompute_num_layers: int | None = None  # full: layers per group (uniform) or per stage (block)
    # Mixture-of-Experts (Megatron-LM's names; Megatron-Core's MoE layer). None: a dense model.
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # one routed expert's FFN width; None: ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # all shared experts together; None: none
    moe_shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    moe_layer_freq: int | list[int] = 1  # N: every N-th layer is MoE; list: 1 MoE / 0 dense per layer
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (needed for top-1)
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None  # group-limited routing (DeepSeek-V3)
    moe_router_group_topk: int | None = None
    moe_router_enable_expert_bias: bool = False  # auxiliary-loss-free balancing (sigmoid router)
    moe_grouped_gemm: bool = False  # GPU only; changes the expert parameter names
    # Runtime-only MoE knobs (RUNTIME_ONLY_FIELDS).
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_bias_update_rate: float = 1e-3
    moe_token_dispatcher_type: str = "allgather"  # allgather | alltoall (Megatron-LM's default)
    # Multi-Latent Attention (DeepSeek-V2/V3; Megatron-Core's MLATransformerConfig names). With it on,
    # num_query_groups/kv_channels are unused and qk_layernorm means the q/kv latent norms.
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None  # None: queries are not compressed (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # per-head query/key width without position embedding
    qk_pos_emb_head_dim: int = 64  # per-head rotary part of query/key
    v_head_dim: int = 128
    rope_type: str = "rope"  # MLA's RoPE: rope | yarn (the YaRN fields below)
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        """Megatron-LM's rule: round the vocab up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}")
        return cls(**values)

    def validate(self) -> None:
        positive = (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "vocab_size",
            "make_vocab_size_divisible_by",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_query_groups ({self.groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless kv_channels is given"
            )
        factor = self.rotary_seq_len_interpolation_factor
        if factor is not None and factor <= 0:
            raise ConfigError(f"model.rotary_seq_len_interpolation_factor must be positive, got {factor}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(
                f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}"
            )
        self._validate_recompute()
        self._validate_moe()
        self._validate_mla()

    def _validate_recompute(self) -> None:
        """Megatron-Core's rules, as one line before anything is built (its asserts are per rank)."""
        granularity, method, layers = (
            self.recompute_granularity,
            self.recompute_method,
            self.recompute_num_layers,
        )
        if granularity is None:
            if method is not None or layers is not None:
                raise ConfigError(
                    "model.recompute_method/recompute_num_layers need model.recompute_granularity=full"
                )
            return
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"model.recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, got {granularity!r}"
            )
        if granularity == "selective":
            if method is not None or layers is not None:
                raise ConfigError(
                    "model.recompute_granularity=selective recomputes core attention only: "
                    "unset model.recompute_method and model.recompute_num_layers"
                )
            return
        if method not in RECOMPUTE_METHODS:
            raise ConfigError(
                f"model.recompute_granularity=full needs model.recompute_method in {RECOMPUTE_METHODS}, "
                f"got {method!r}"
            )
        if layers is None or layers < 1:
            raise ConfigError(
                f"model.recompute_granularity=full needs model.recompute_num_layers >= 1, got {layers}"
            )

    def moe_layer_pattern(self) -> list[int]:
        """1 (MoE) or 0 (dense) per layer, as Megatron-Core's ``get_gpt_decoder_layer_specs`` reads
        ``moe_layer_freq``; all 0 for a dense model."""
        if self.num_moe_experts is None:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            return list(freq)
        return [int(i % freq == 0) for i in range(self.num_layers)]

    def _validate_moe(self) -> None:
        """Megatron-Core's MoE rules (``TransformerConfig.__post_init__``, ``get_gpt_decoder_layer_specs``)
        as one line, before any rank builds a layer."""
        experts = self.num_moe_experts
        if experts is None:
            moe_only = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
            given = [name for name in moe_only if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"model.{given[0]} is set but model.num_moe_experts is not (a dense model)")
            return
        if experts < 1:
            raise ConfigError(f"model.num_moe_experts must be >= 1, got {experts}")
        if not 1 <= self.moe_router_topk <= experts:
            raise ConfigError(
                f"model.moe_router_topk ({self.moe_router_topk}) must be between 1 and "
                f"model.num_moe_experts ({experts})"
            )
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be positive, got {value}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ConfigError("model.moe_shared_expert_gate needs model.moe_shared_expert_intermediate_size")
        self._validate_moe_layer_freq()
        self._validate_router()

    def _validate_moe_layer_freq(self) -> None:
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            if len(freq) != self.num_layers or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
                raise ConfigError(
                    f"model.moe_layer_freq as a list needs one 0 (dense) or 1 (MoE) per layer "
                    f"({self.num_layers}), got {freq}"
                )
        elif freq < 1:
            raise ConfigError(f"model.moe_layer_freq must be >= 1 (every N-th layer is MoE), got {freq}")
        if not any(self.moe_layer_pattern()):
            raise ConfigError(f"model.moe_layer_freq {freq} makes no layer MoE; unset model.num_moe_experts")

    def _validate_router(self) -> None:
        experts, score = self.num_moe_experts, self.moe_router_score_function
        choices = (
            ("moe_router_score_function", score, MOE_SCORE_FUNCTIONS),
            ("moe_router_load_balancing_type", self.moe_router_load_balancing_type, MOE_LOAD_BALANCING_TYPES),
            ("moe_token_dispatcher_type", self.moe_token_dispatcher_type, MOE_TOKEN_DISPATCHERS),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"model.{name} must be one of {allowed}, got {value!r}")
        if self.moe_router_topk == 1 and score == "softmax" and not self.moe_router_pre_softmax:
            # Megatron-Core: a softmax over the top-1 logit alone is 1 and has no gradient.
            raise ConfigError(
                "model.moe_router_topk=1 with the softmax router needs model.moe_router_pre_softmax=true"
            )
        if self.moe_router_enable_expert_bias and score != "sigmoid":
            raise ConfigError(
                "model.moe_router_enable_expert_bias (aux-loss-free balancing) needs "
                "model.moe_router_score_function=sigmoid"
            )
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0.0) < 0:
            raise ConfigError("model.moe_aux_loss_coeff and model.moe_z_loss_coeff must be >= 0")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if group_topk is None:
            if groups is not None:
                raise ConfigError("model.moe_router_num_groups needs model.moe_router_group_topk")
            return
        if groups is None or groups < 1 or experts % groups:
            raise ConfigError(
                f"model.moe_router_group_topk needs model.moe_router_num_groups dividing "
                f"num_moe_experts ({experts}), got {groups}"
            )
        if not 1 <= group_topk <= groups:
            raise ConfigError(
                f"model.moe_router_group_topk ({group_topk}) must be between 1 and "
                f"model.moe_router_num_groups ({groups})"
            )

    def _validate_mla(self) -> None:
        """Megatron-Core's ``MultiLatentAttention`` needs, as one line before anything is built."""
        if not self.multi_latent_attention:
            return
        ranks = ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
        for name in ranks + (("q_lora_rank",) if self.q_lora_rank is not None else ()):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"model.qk_pos_emb_head_dim must be even, got {self.qk_pos_emb_head_dim}")
        if self.rope_type not in MLA_ROPE_TYPES:
            raise ConfigError(f"model.rope_type must be one of {MLA_ROPE_TYPES}, got {self.rope_type!r}")
        unsupported = {
            "position_embedding_type=rope": self.position_embedding_type != "rope",
            "no use_rope_scaling (MLA's own rope_type=yarn scales)": self.use_rope_scaling,
            "no rotary_seq_len_interpolation_factor": self.rotary_seq_len_interpolation_factor is not None,
            "rotary_percent=1.0": self.rotary_percent != 1.0,
            "no add_qkv_bias": self.add_qkv_bias,
            "attention_backend sdpa or auto (unfused: one head width)": self.attention_backend == "unfused",
        }
        missing = [need for need, violated in unsupported.items() if violated]
        if missing:
            raise ConfigError(f"model.multi_latent_attention needs {', '.join(missing)}")
