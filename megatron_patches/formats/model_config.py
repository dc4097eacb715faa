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
)
# Activation recompute (Megatron-LM's names): "full" recomputes whole layers in backward
# (recompute_method uniform|block, recompute_num_layers), "selective" only core attention.
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


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
