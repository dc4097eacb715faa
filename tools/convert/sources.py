"""Where canonical tensors come from: an HF directory or a Megatron checkpoint.

A source answers, for every Megatron-Core parameter name (global layer
numbers), the canonical whole tensor (``tensor``) or its shape and dtype
without reading data (``meta``). ``check`` validates every shape against the
config before the caller writes anything; ``release`` lets the source drop
what it has read so far, which keeps memory flat while a writer streams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats.model_config import ModelConfig
from tools.convert import layout, mcore_io
from tools.convert.families import Family, default_family, family_of
from tools.convert.hf_io import HFCheckpoint
from tools.convert.mapping import Entry, ZeroBias, same_replicas
from tools.convert.readahead import read_ahead

# Tensors some HF checkpoints carry that no model parameter stands for.
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
# Read this much from memory-mapped rank files before dropping the mappings.
_MCORE_READ_BUDGET = 512 << 20


def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


class Source(Protocol):
    """What writers and commands need of a source: :class:`HFSource` and :class:`McoreSource` are two."""

    cfg: ModelConfig

    def names(self) -> list[str]: ...
    def check(self) -> None: ...
    def meta(self, name: str) -> torch.Tensor: ...
    def tensor(self, name: str) -> torch.Tensor: ...
    def shard(self, name: str, tp: int, rank: int) -> torch.Tensor: ...
    def hf_pieces(self, name: str, entry: Entry) -> list[list[torch.Tensor]]: ...
    def release(self) -> None: ...


class HFSource:
    """Canonical tensors computed from an HF checkpoint, one HF tensor read at a time."""

    def __init__(self, directory: str | Path, family: Family | None = None) -> None:
        self.ckpt = HFCheckpoint(directory)
        self.family = family or family_of(self.ckpt.config)
        self.cfg: ModelConfig = self.family.read_config(self.ckpt.config)
        layout.check_supported(self.cfg)
        self.cfg.validate()
        self.entries = self.family.expand(self.cfg)
        self._by_name = {e.at(i)[0]: (e, i) for e, i in self.entries if e.mcore}

    def names(self) -> list[str]:
        return list(self._by_name)

    def check(self) -> None:
        """Every HF tensor the config implies exists with the implied shape; nothing unknown is left."""
        shapes = layout.canonical_shapes(self.cfg)
        used = set()
        for entry, layer in self.entries:
            mcore, hf_names = entry.at(layer)
            implied = entry.to_hf(_meta(shapes[mcore]) if mcore else None, self.cfg)
            for name, want in zip(hf_names, implied, strict=True):
                have = tuple(self.ckpt.meta(name).shape)
                if have != tuple(want.shape):
                    raise ConfigError(
                        f"{name} has shape {list(have)} in the checkpoint "
                        f"but config.json implies {list(want.shape)}"
                    )
                used.add(name)
            if isinstance(entry, ZeroBias):
                entry.check(self.ckpt.tensor(hf_names[0]), hf_names[0])
        tied_head = () if self.cfg.untie_embeddings_and_output_weights else ("lm_head.weight",)
        unknown = [n for n in self.ckpt.names() if n not in used and n not in tied_head]
        unknown = [n for n in unknown if not n.endswith(_IGNORED_HF_SUFFIXES)]
        if unknown:
            raise ConfigError(
                f"{len(unknown)} tensors the {self.family.name} mapping does not know, e.g. {unknown[0]}"
            )

    def _entry(self, name: str) -> tuple[Entry, tuple[str, ...]]:
        entry, layer = self._by_name[name]
        return entry, entry.at(layer)[1]

    def meta(self, name: str) -> torch.Tensor:
        entry, hf_names = self._entry(name)
        return entry.to_mcore([self.ckpt.meta(n) for n in hf_names], self.cfg)

    def tensor(self, name: str) -> torch.Tensor:
        entry, hf_names = self._entry(name)
        return entry.to_mcore([self.ckpt.tensor(n) for n in hf_names], self.cfg)

    def shard(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """One TP rank's piece, computed from the HF rows that rank needs."""
        entry, hf_names = self._entry(name)
        return entry.shard([self.ckpt.tensor(n) for n in hf_names], self.cfg, tp, rank)

    def hf_pieces(self, name: str, entry: Entry) -> list[list[torch.Tensor]]:
        """``entry``'s HF tensors of canonical parameter ``name`` (see :meth:`Entry.hf_pieces`)."""
        return [[tensor] for tensor in entry.to_hf(self.tensor(name), self.cfg)]

    def release(self) -> None:
        self.ckpt.release()


class McoreSource:
    """Canonical tensors merged from the TP shards of a Megatron checkpoint (legacy or torch_dist).

    This project's checkpoints and Megatron-LM's (through their ``args``) describe
    their model; ``model_config`` is the architecture of one that does not.
    """

    def __init__(
        self, path: str | Path, iteration: int | str | None = None, model_config: ModelConfig | None = None
    ) -> None:
        self.root, self.iter_dir = ckpt_format.resolve(path, iteration)
        self.format = ckpt_format.checkpoint_format(self.iter_dir)
        if self.format == "torch_dist":
            self._dist, self.cfg, self.iteration = mcore_io.open_torch_dist(self.iter_dir, model_config)
            self.tp, self.pp, self.ep = 1, 1, 1
            self.pp_ranks = self.chunks = 1
            self._stages = {0: [self._dist.metas()]}  # shapes only: _shards reads each tensor when asked
        else:
            self.tp, self.pp, self.ep = ckpt_format.legacy_grid(self.iter_dir)
            first = ckpt_format.load_rank(self.iter_dir, 0, 0, self.pp, mmap=True, ep_size=self.ep)
            # Interleaved pipeline (model0, model1, ... per rank file): self.pp counts virtual stages
            self.pp_ranks, self.chunks = self.pp, ckpt_format.model_chunk_count(first)
            self.pp = self.pp_ranks * self.chunks
            self.cfg = ckpt_format.model_config_of(first, self.iter_dir, model_config)
            self.iteration = first.get("iteration", 0)
            self._stages = {}
        layout.check_supported(self.cfg)
        self.table = default_family(self.cfg).expand(self.cfg)
        self._by_name = {e.at(i)[0]: e for e, i in self.table if e.mcore}
        self._shapes = layout.canonical_shapes(self.cfg)
        self.pipeline = self._infer_pipeline()
        self.etp = self._infer_expert_tp()
        self._read = 0

    def _load_stage(self, stage: int) -> list[dict[str, torch.Tensor]]:
        if stage not in self._stages:
            if self.format == "torch":
                self._stages.clear()  # at most one stage's files mapped at a time
            self._stages[stage] = [self._tp_rank_tensors(t, stage) for t in range(self.tp)]
        return self._stages[stage]

    def _tp_rank_tensors(self, tp_rank: int, stage: int) -> dict[str, torch.Tensor]:
        """One TP rank's tensors of ``stage``; with EP, its EP ranks' files, experts by global number
        (the dense parameters every EP rank holds are read from EP rank 0)."""
        tensors = {}
        pp_rank, chunk = stage % self.pp_ranks, stage // self.pp_ranks  # ckpt_format.virtual_stage
        for ep_rank in reversed(range(self.ep)):
            state = ckpt_format.load_rank(
                self.iter_dir, tp_rank, pp_rank, self.pp_ranks, True, ep_rank, self.ep
            )
            names = self._local_names(ckpt_format.chunk_model(state, chunk))
            tensors.update(
                {layout.ep_global_name(n, self.cfg, self.ep, ep_rank): t for n, t in names.items()}
            )
        return tensors

    @staticmethod
    def _local_names(model: dict) -> dict[str, torch.Tensor]:
        """Accept either layer spec: TE names become local names, ``_extra_state`` is dropped."""
        return {name: value for key, value in model.items() if (name := layout.from_spec(key))}

    def _infer_pipeline(self) -> layout.Pipeline:
        counts = []
        for stage in range(self.pp):
            names = self._load_stage(stage)[0]
            counts.append(len({p[0] for n in names if (p := layout.split_layer_name(n))}))
        if sum(counts) != self.cfg.num_layers:
            raise ConfigError(
                f"{self.iter_dir} holds {sum(counts)} layers but model_config has {self.cfg.num_layers}"
            )
        return layout.Pipeline(tuple(counts))

    def _infer_expert_tp(self) -> int:
        """How routed experts are split over TP (ETP: TP or 1), from a stored expert's width."""
        if self.tp == 1 or not self.cfg.num_moe_experts:
            return self.tp
        width = self.cfg.moe_ffn_hidden_size or self.cfg.ffn_hidden_size
        for stage in range(self.pp):
            for name, tensor in self._load_stage(stage)[0].items():
                if layout.split_expert_name(name) and name.endswith(".linear_fc2.weight"):
                    return 1 if tensor.shape[-1] == width else self.tp
        return self.tp

    def _split_shape(self, name: str, tp_rank: int) -> torch.Size:
        """The shape TP rank ``tp_rank`` holds of canonical parameter ``name``."""
        parts, part = layout.tp_split(name, self.tp, self.etp, tp_rank)
        return self._by_name[name].split(_meta(self._shapes[name]), parts, self.cfg)[part].shape

    def _merge(self, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        """The canonical tensor from every TP rank's piece (ETP = 1: all hold the whole expert)."""
        return self._by_name[name].merge(self._distinct(name, shards), self.cfg)

    def _distinct(self, name: str, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        if layout.tp_split(name, self.tp, self.etp, 0)[0] == 1 < len(shards):
            return [same_replicas(shards, name)]
        return shards

    def names(self) -> list[str]:
        return list(self._by_name)

    def check(self) -> None:
        """Every rank holds exactly the shards the config implies, with the implied shapes."""
        tied_copy = (layout.OUTPUT,) if not self.cfg.untie_embeddings_and_output_weights else ()
        for stage in range(self.pp):
            expected = layout.stage_params(self.names(), self.pipeline, stage)
            for tp_rank, tensors in enumerate(self._load_stage(stage)):
                for name, local in expected:
                    want = self._split_shape(name, tp_rank)
                    if local not in tensors or tensors[local].shape != want:
                        have = list(tensors[local].shape) if local in tensors else "missing"
                        raise ConfigError(
                            f"TP {tp_rank} PP {stage}: {local} is {have}, expected {list(want)}"
                        )
                unknown = set(tensors) - {local for _, local in expected} - set(tied_copy)
                if unknown:
                    raise ConfigError(f"TP {tp_rank} PP {stage}: unexpected parameter {sorted(unknown)[0]}")

    def _locate(self, name: str) -> tuple[int, str]:
        """(stage, local name) of a canonical parameter."""
        layer = layout.split_layer_name(name)
        if layer:
            stage, local = self.pipeline.stage_of(layer[0])
            return stage, layout.layer_param(local, layer[1])
        return (0 if name == layout.EMBEDDING else self.pp - 1), name

    def _shards(self, name: str) -> list[torch.Tensor]:
        stage, local = self._locate(name)
        if self.format == "torch_dist":
            return [self._dist.read(local)]
        shards = [tensors[local] for tensors in self._load_stage(stage)]
        read_ahead(shards)  # mapped rank files: from a cold cache, read in one go rather than fault by fault
        return shards

    def meta(self, name: str) -> torch.Tensor:
        stage, local = self._locate(name)
        shards = [torch.empty_like(tensors[local], device="meta") for tensors in self._load_stage(stage)]
        return self._merge(name, shards)

    def tensor(self, name: str) -> torch.Tensor:
        shards = self._shards(name)
        self._read += sum(s.numel() * s.element_size() for s in shards)
        return self._merge(name, shards)

    def shard(self, name: str, tp: int, rank: int) -> torch.Tensor:
        return self._by_name[name].split(self.tensor(name), tp, self.cfg)[rank]

    def hf_pieces(self, name: str, entry: Entry) -> list[list[torch.Tensor]]:
        """``entry``'s HF tensors of ``name`` as views of the stored TP pieces where the layout allows:
        written one after another, with no concatenated copy in between (see :meth:`Entry.hf_pieces`)."""
        shards = self._shards(name)
        self._read += sum(s.numel() * s.element_size() for s in shards)
        return entry.hf_pieces(self._distinct(name, shards), self.cfg)

    def release(self) -> None:
        if self.format == "torch" and self._read > _MCORE_READ_BUDGET:
            self._stages.clear()
            self._read = 0
