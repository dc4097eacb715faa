"""Flash attention without Transformer Engine: ``scaled_dot_product_attention`` as core attention.

Megatron-Core's local spec computes attention with ``DotProductAttention``
(``transformer/dot_product_attention.py``): GQA keys/values repeated to every
query head, an explicit ``[b, heads, s, s]`` score matrix from ``baddbmm``,
softmax, dropout, ``bmm``. That is O(s^2) memory and no fused kernel. Here the
same module is subclassed and only ``forward`` changes: one call to
``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2 or
memory-efficient kernels on GPU, a fused kernel on CPU) with ``is_causal`` and
``enable_gqa``, so keys/values are never repeated. Parameters, sharded state
dict and TP layout are the parent's, so checkpoints do not depend on the choice.

Select with ``model.attention_backend=sdpa`` (the default for the local spec).
Supported: causal masks, vanilla softmax, no sliding window, no packed
sequences, no context parallelism (what the parent supports, minus windows).
An explicit ``attention_mask`` (Megatron's convention: True where attention is
forbidden, e.g. the document mask of ``data.reset_attention_mask``) replaces the
implicit causal mask, as it does in the parent's softmax.
"""

from __future__ import annotations

import contextlib

from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.nn import functional as F

from megatron_patches.compat import require_signature
from megatron_patches.errors import ConfigError

require_signature(
    DotProductAttention.__init__,
    [
        "self",
        "config",
        "layer_number",
        "attn_mask_type",
        "attention_type",
        "attention_dropout",
        "softmax_scale",
    ],
)
require_signature(
    DotProductAttention.forward,
    [
        "self",
        "query",
        "key",
        "value",
        "attention_mask",
        "attn_mask_type",
        "attention_bias",
        "packed_seq_params",
    ],
)


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose forward is one fused ``scaled_dot_product_attention``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        *args,
        k_channels: int | None = None,
        v_channels: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if v_channels is not None:
            # Multi-Latent Attention (MultiLatentAttention.__init__) passes its head widths: queries and
            # keys k_channels wide, values v_channels; the output holds v_channels per head. The parent
            # (Megatron-Core 0.16.1's DotProductAttention) takes neither and assumes kv_channels for both.
            heads = self.num_attention_heads_per_partition
            self.hidden_size_per_partition = heads * v_channels
        unsupported = {
            "a causal mask": attn_mask_type != AttnMaskType.causal,
            "vanilla softmax": config.softmax_type != "vanilla",
            "no sliding window": config.window_size is not None,
            "no query-key layer scaling": config.apply_query_key_layer_scaling,
        }
        missing = [need for need, violated in unsupported.items() if violated]
        if missing:
            raise ConfigError(
                f"attention_backend=sdpa needs {', '.join(missing)}; use attention_backend=unfused"
            )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        assert packed_seq_params is None and attention_bias is None, "SDPAttention: no packing or bias"
        # Megatron layout [s, b, heads, dim] -> SDPA layout [b, heads, s, dim].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        # Dropout inside attention is a tensor-parallel region: draw from the TP stream as the parent does.
        fork = tensor_parallel.get_cuda_rng_tracker().fork
        # SDPA's boolean mask is True where attention is allowed: the inverse of Megatron's.
        allowed = None if attention_mask is None else ~attention_mask
        with contextlib.nullcontext() if self.config.sequence_parallel else fork():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout,
                is_causal=allowed is None,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        # [b, heads, s, dim] -> [s, b, heads * dim]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)
