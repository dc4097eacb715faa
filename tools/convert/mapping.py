"""Typed weight-mapping entries: one Megatron-Core parameter, its HF tensors, its TP shards.

Every conversion goes through one *canonical* tensor per Megatron-Core
parameter: the whole (TP=1) tensor with the true, unpadded vocabulary. An
entry knows two pure transformations of it:

* ``to_mcore`` / ``to_hf``: HF tensors <-> canonical tensor (rename, QKV
  regrouping, gate/up concatenation, NormHead normalization);
* ``split`` / ``merge``: canonical tensor <-> the TP shards Megatron-Core
  holds on each rank (column/row split, vocabulary padding, the gated-MLP
  per-rank gate/up layout).

Families (``families/``) list entries declaratively; the same table serves
HF->Megatron, Megatron->HF and Megatron->Megatron. Every function here is
pure and also runs on ``meta`` tensors, which is how shapes are planned and
checked before any byte is read or written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig

LAYER = "{i}"  # placeholder for the global layer number in entry names
EXPERT = "{j}"  # placeholder for the global expert number (routed experts of an MoE layer)


# ---------------------------------------------------------------- pure math


def cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``; of ``meta`` tensors, an empty one of the result's shape: torch.cat's meta kernel
    imports ``torch._dynamo``, 1.5 s of a converter's start-up spent planning shapes."""
    first = tensors[0]
    if first.device.type != "meta":
        return torch.cat(tensors, dim=dim)
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return first.new_empty(shape)


def chunks(tensor: torch.Tensor, parts: int, dim: int, what: str) -> list[torch.Tensor]:
    """``parts`` equal views along ``dim``; a remainder is an error, never a ragged split."""
    if tensor.shape[dim] % parts:
        raise ConfigError(f"{what}: size {tensor.shape[dim]} along dim {dim} is not divisible by {parts}")
    return list(tensor.chunk(parts, dim=dim))


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Separate q/k/v rows -> Megatron-Core's fused ``linear_qkv`` layout.

    Megatron-Core views the fused output as ``[groups, (heads/groups + 2) * head_dim]``:
    for each query group, its query heads, then its key head, then its value head.
    Works for weights (2-D) and biases (1-D).
    """
    rest = q.shape[1:]
    return cat(
        [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], dim=1
    ).reshape(-1, *rest)


def ungroup_qkv(fused: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`group_qkv`."""
    rest = fused.shape[1:]
    per_group = heads // groups
    head_dim = fused.shape[0] // (groups * (per_group + 2))
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(part.reshape(-1, *rest) for part in (q, k, v))


def qkv_blocks(fused: torch.Tensor, heads: int, groups: int) -> tuple[list[torch.Tensor], ...]:
    """:func:`ungroup_qkv`'s q, k and v as one row block (a view of ``fused``) per query group."""
    per_group = heads // groups
    head_dim = fused.shape[0] // (groups * (per_group + 2))
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *fused.shape[1:])
    blocks = [group.split([per_group * head_dim, head_dim, head_dim]) for group in grouped]
    return tuple(list(part) for part in zip(*blocks, strict=True))


def split_qkv(fused: torch.Tensor, heads: int, groups: int, tp: int) -> list[torch.Tensor]:
    """TP shards of a fused QKV: whole query groups per rank, so a plain row split."""
    if groups % tp:
        raise ConfigError(f"num_query_groups ({groups}) is not divisible by TP ({tp})")
    return chunks(fused, tp, 0, "linear_qkv")


def split_gated(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """``[gate; up]`` -> per rank ``[gate_r; up_r]`` (each rank applies SwiGLU to its own halves)."""
    gate, up = chunks(full, 2, 0, "linear_fc1")
    return [cat(pair) for pair in zip(chunks(gate, tp, 0, "gate"), chunks(up, tp, 0, "up"), strict=True)]


def merge_gated(shards: list[torch.Tensor]) -> torch.Tensor:
    halves = [chunks(shard, 2, 0, "linear_fc1 shard") for shard in shards]
    return cat([cat([h[0] for h in halves]), cat([h[1] for h in halves])])


def expert_place(expert: int, experts: int, ep: int) -> tuple[int, int]:
    """Global expert -> (EP rank, index local to it): Megatron-Core gives each EP rank a contiguous block
    (``SequentialMLP``'s ``local_expert_indices_offset = ep_rank * num_local_experts``)."""
    if experts % ep:
        raise ConfigError(f"num_moe_experts ({experts}) is not divisible by EP ({ep})")
    return divmod(expert, experts // ep)


def global_expert(local: int, ep_rank: int, experts: int, ep: int) -> int:
    """Inverse of :func:`expert_place`."""
    return ep_rank * (experts // ep) + local


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to ``rows``: padded token ids never occur in input and are cut on export."""
    extra = rows - tensor.shape[0]
    if extra < 0:
        raise ConfigError(f"cannot pad {tensor.shape[0]} vocabulary rows down to {rows}")
    if extra == 0:
        return tensor
    return cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Baichuan2's NormHead applied once: unit-L2 rows, computed in fp32."""
    return torch.nn.functional.normalize(weight.float(), dim=1).to(weight.dtype)


def same_replicas(shards: list[torch.Tensor], what: str) -> torch.Tensor:
    first = shards[0]
    if first.device.type != "meta":
        for rank, shard in enumerate(shards[1:], start=1):
            if not torch.equal(first, shard):
                raise ConfigError(f"{what}: TP rank {rank} holds a different copy than rank 0")
    return first


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One Megatron-Core parameter (``mcore``) and the HF tensors it comes from (``hf``).

    Names may contain ``{i}``, the global layer number. The base class is a
    rename whose TP split subclasses define.
    """

    mcore: str
    hf: tuple[str, ...]

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore or any(LAYER in name for name in self.hf)

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    def for_expert(self, expert: int) -> Entry:
        """This entry for routed expert ``expert`` (names with ``{j}`` filled in; the math is the same)."""
        fill = str(expert)
        return dataclasses.replace(
            self, mcore=self.mcore.replace(EXPERT, fill), hf=tuple(n.replace(EXPERT, fill) for n in self.hf)
        )

    def at(self, layer: int | None) -> tuple[str, tuple[str, ...]]:
        if layer is None:
            return self.mcore, self.hf
        return self.mcore.format(i=layer), tuple(name.format(i=layer) for name in self.hf)

    def to_mcore(self, hf: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return hf[0]

    def to_hf(self, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return [full]

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        raise NotImplementedError

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        raise NotImplementedError

    def shard(self, hf: list[torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
        """``split(to_mcore(hf))[rank]``; subclasses compute it from only the rows ``rank`` needs."""
        return self.split(self.to_mcore(hf, cfg), tp, cfg)[rank]

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        """``to_hf(merge(shards))``, each HF tensor as row blocks whose bytes, one after another, are its
        bytes; subclasses give views of the shards, so an export writes them without concatenating."""
        return [[tensor] for tensor in self.to_hf(self.merge(shards, cfg), cfg)]


class Replicated(Entry):
    """Every TP rank holds the whole tensor (norm weights)."""

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return [full] * tp

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return same_replicas(shards, self.mcore)


class ColumnParallel(Entry):
    """Output rows split over TP (``ColumnParallelLinear``)."""

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return chunks(full, tp, 0, self.mcore)

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return cat(shards, dim=0)

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        return [list(shards)]


class RowParallel(Entry):
    """Input columns split over TP (``RowParallelLinear``)."""

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return chunks(full, tp, 1, self.mcore)

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return cat(shards, dim=1)


def vocab_rows(full: torch.Tensor, tp: int, rank: int, cfg: ModelConfig) -> tuple[torch.Tensor, int]:
    """(the unpadded vocabulary rows TP ``rank`` holds, as a view; the padded rows per rank)."""
    rows = cfg.padded_vocab_size(tp) // tp
    return full[rank * rows : (rank + 1) * rows], rows


class VocabParallel(Entry):
    """Embedding / output layer: padded to Megatron-LM's vocabulary size, then row split."""

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return [pad_rows(*vocab_rows(full, tp, rank, cfg)) for rank in range(tp)]

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        full = cat(shards, dim=0)
        if full.shape[0] < cfg.vocab_size:
            raise ConfigError(f"{self.mcore}: {full.shape[0]} rows, fewer than vocab_size {cfg.vocab_size}")
        return full[: cfg.vocab_size]

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        """Each rank's rows up to ``vocab_size``: the padding rows are cut as :meth:`merge` cuts them."""
        rows = sum(shard.shape[0] for shard in shards)
        if rows < cfg.vocab_size:
            raise ConfigError(f"{self.mcore}: {rows} rows, fewer than vocab_size {cfg.vocab_size}")
        pieces, left = [], cfg.vocab_size
        for shard in shards:
            if left > 0:
                pieces.append(shard[:left])
            left -= shard.shape[0]
        return [pieces]


class NormHead(VocabParallel):
    """Baichuan2's ``lm_head``: rows normalized on import, so a plain output layer gives the same logits."""

    def to_mcore(self, hf: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return normalize_rows(hf[0])

    def shard(self, hf: list[torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
        # Normalizing the whole head in fp32 for every rank would cost several
        # times one shard (7B: 2 GiB); rows normalize independently, so
        # normalizing only this rank's rows gives bit-identical values.
        mine, rows = vocab_rows(hf[0], tp, rank, cfg)
        return pad_rows(normalize_rows(mine), rows)


class QKV(ColumnParallel):
    """HF ``q_proj``/``k_proj``/``v_proj`` (weights or biases) <-> fused, group-major ``linear_qkv``."""

    def parts(self, hf: list[torch.Tensor], cfg: ModelConfig) -> list[torch.Tensor]:
        return hf

    def to_mcore(self, hf: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return group_qkv(*self.parts(hf, cfg), cfg.num_attention_heads, cfg.groups)

    def to_hf(self, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return list(ungroup_qkv(full, cfg.num_attention_heads, cfg.groups))

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        """q, k and v, each one row block per query group: a rank holds whole groups (:func:`split_qkv`)."""
        tp = len(shards)
        if cfg.groups % tp:
            return super().hf_pieces(shards, cfg)  # merge refuses the split
        per_rank = [qkv_blocks(shard, cfg.num_attention_heads // tp, cfg.groups // tp) for shard in shards]
        return [[block for blocks in per_rank for block in blocks[part]] for part in range(3)]

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return split_qkv(full, cfg.num_attention_heads, cfg.groups, tp)

    def shard(self, hf: list[torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
        if cfg.groups % tp:
            raise ConfigError(f"num_query_groups ({cfg.groups}) is not divisible by TP ({tp})")
        mine = [chunks(part, tp, 0, self.mcore)[rank] for part in self.parts(hf, cfg)]
        return group_qkv(*mine, cfg.num_attention_heads // tp, cfg.groups // tp)


class PackedQKV(QKV):
    """One HF tensor holding ``[q; k; v]`` (Baichuan's ``W_pack``)."""

    def parts(self, hf: list[torch.Tensor], cfg: ModelConfig) -> list[torch.Tensor]:
        q_rows = cfg.num_attention_heads * cfg.head_dim
        kv_rows = cfg.groups * cfg.head_dim
        return list(hf[0].split([q_rows, kv_rows, kv_rows], dim=0))

    def to_hf(self, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return [cat(super().to_hf(full, cfg))]

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        return [[piece for part in super().hf_pieces(shards, cfg) for piece in part]]


class GatedMLP(Entry):
    """HF ``gate_proj`` and ``up_proj`` <-> ``linear_fc1`` = ``[gate; up]``, split per TP rank."""

    def to_mcore(self, hf: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return cat(hf, dim=0)

    def to_hf(self, full: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        return chunks(full, 2, 0, self.mcore)

    def split(self, full: torch.Tensor, tp: int, cfg: ModelConfig) -> list[torch.Tensor]:
        return split_gated(full, tp)

    def merge(self, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return merge_gated(shards)

    def hf_pieces(self, shards: list[torch.Tensor], cfg: ModelConfig) -> list[list[torch.Tensor]]:
        halves = [chunks(shard, 2, 0, "linear_fc1 shard") for shard in shards]
        return [[h[0] for h in halves], [h[1] for h in halves]]

    def shard(self, hf: list[torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
        return cat([chunks(part, tp, 0, self.mcore)[rank] for part in hf])


class ZeroBias(Entry):
    """An HF bias Megatron-Core has no parameter for; it must be zero (``mcore`` is empty).

    HF Llama's ``attention_bias`` adds an ``o_proj`` bias next to the q/k/v
    biases; Megatron-Core's ``add_qkv_bias`` has only the latter, so the model
    is the same function exactly when that bias is zero. Export writes zeros.
    """

    def __init__(self, hf: str) -> None:
        super().__init__("", (hf,))

    def to_hf(self, full: torch.Tensor | None, cfg: ModelConfig) -> list[torch.Tensor]:
        return [torch.zeros(cfg.hidden_size)]

    def check(self, tensor: torch.Tensor, name: str) -> None:
        if torch.count_nonzero(tensor):
            raise ConfigError(
                f"{name} is not zero: Megatron-Core's add_qkv_bias has no output-projection bias, "
                "so this model cannot be converted exactly"
            )
