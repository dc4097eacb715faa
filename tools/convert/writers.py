"""Where canonical tensors go: Megatron rank files, a torch_dist checkpoint, or HF safetensors.

Writers pull one tensor at a time from a source (``sources.py``), copy out
the piece they keep, and tell the source to release what it read, so memory
stays near one output shard (legacy format) or one HF tensor (HF format).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_patches.formats import checkpoint as ckpt_format
from tools.convert import layout, mcore_io
from tools.convert.families import Family
from tools.convert.hf_io import ShardedSafetensorsWriter
from tools.convert.progress import Progress
from tools.convert.rank_stream import StreamedRankFile
from tools.convert.sources import Source


def owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` at ``dtype`` with a storage of its own (``torch.save`` writes a view's whole base)."""
    dtype = dtype or tensor.dtype
    exact = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.dtype == dtype and tensor.is_contiguous() and tensor.storage_offset() == 0 and exact:
        return tensor  # already a fresh tensor (e.g. from a concatenation): no second copy
    out = torch.empty(tensor.shape, dtype=dtype)
    out.copy_(tensor)
    return out


def model_dtype(source: Source) -> torch.dtype:
    return source.meta(layout.EMBEDDING).dtype


def rank_tensors(
    source: Source,
    tp: int,
    tp_rank: int,
    pipeline: layout.Pipeline,
    stage: int,
    dtype: torch.dtype | None,
    ep: int = 1,
    ep_rank: int = 0,
    etp: int | None = None,
    release: Callable[[], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """One rank's parameters (local-spec names; layers local to the stage, experts to the EP rank).

    ``release`` (default ``source.release``) runs once the caller is done with each tensor."""
    cfg = source.cfg
    params = layout.ep_params(layout.stage_params(source.names(), pipeline, stage), cfg, ep, ep_rank)
    last = stage == pipeline.size - 1
    if last and pipeline.size > 1 and not cfg.untie_embeddings_and_output_weights:
        # Tied weights on a separate last stage: Megatron-Core keeps a copy there.
        params.append((layout.EMBEDDING, layout.OUTPUT))
    for name, local in params:
        parts, part = layout.tp_split(name, tp, tp if etp is None else etp, tp_rank)
        yield local, owned(source.shard(name, parts, part), dtype)
        (release or source.release)()


def rank_count(source: Source, tp: int, pipeline: layout.Pipeline, ep: int = 1) -> int:
    """Tensors to write: every EP rank holds the dense parameters and its share of the experts."""
    tied_copy = int(pipeline.size > 1 and not source.cfg.untie_embeddings_and_output_weights)
    experts = sum(1 for name in source.names() if layout.split_expert_name(name))
    return tp * (ep * (len(source.names()) - experts + tied_copy) + experts)


def write_mcore(
    source: Source,
    iter_dir: Path,
    tp: int,
    pipeline: layout.Pipeline,
    progress: Progress,
    fmt: str = "torch",
    spec: str = "local",
    dtype: torch.dtype | None = None,
    iteration: int = 0,
    ep: int = 1,
    etp: int | None = None,
    grouped: bool = False,
) -> None:
    cfg = source.cfg
    if fmt == "torch_dist":
        write_torch_dist(source, iter_dir, progress, dtype, iteration, spec)
        return
    saved_cfg = dataclasses.replace(cfg, moe_grouped_gemm=grouped)  # the expert layout the files hold
    for pp_rank in range(pipeline.ranks):
        for tp_rank, ep_rank in itertools.product(range(tp), range(ep)):
            progress.shard(ckpt_format.rank_dir_name(tp_rank, pp_rank, pipeline.ranks, ep_rank, ep))
            path = ckpt_format.rank_file(iter_dir, tp_rank, pp_rank, pipeline.ranks, ep_rank, ep)
            with StreamedRankFile(path) as stream:  # each tensor written as it is made: never a whole rank
                release = stream.after_written(source.release)
                chunks = []  # one state dict per virtual pipeline stage of this rank (model0, ...), else one
                for stage in pipeline.stages_of(pp_rank):
                    last = stage == pipeline.size - 1
                    tensors = rank_tensors(
                        source, tp, tp_rank, pipeline, stage, dtype, ep, ep_rank, etp, release
                    )
                    first = pipeline.offset(stage)
                    model = {
                        layout.spec_name(name, spec, cfg, first, grouped): stream.add(progress.add(t))
                        for name, t in tensors
                    }
                    extra = layout.extra_state_keys(cfg, pipeline.counts[stage], last, spec, model)
                    model.update(stream.add_state(extra))
                    chunks.append(model)
                mcore_io.save_rank(
                    iter_dir,
                    tp_rank,
                    pp_rank,
                    pipeline.ranks,
                    chunks,
                    saved_cfg,
                    iteration,
                    list(pipeline.counts),
                    tp,
                    ep_rank=ep_rank,
                    ep_size=ep,
                    stream=stream,
                )
            del chunks, model  # else they live on while the next rank's are built: two shards in memory


def write_torch_dist(
    source: Source,
    iter_dir: Path,
    progress: Progress,
    dtype: torch.dtype | None,
    iteration: int = 0,
    spec: str = "local",
) -> None:
    """The whole (TP=1) model as one torch_dist checkpoint, each tensor read as the writer reaches it."""
    cfg = source.cfg
    shapes = layout.canonical_shapes(cfg)
    vocab_rows = cfg.padded_vocab_size(1)
    whole = layout.Pipeline((cfg.num_layers,))
    canonical = {local: name for name, local in layout.stage_params(source.names(), whole, 0)}
    for vocab in (layout.EMBEDDING, layout.OUTPUT):
        if vocab in shapes:
            shapes[vocab] = (vocab_rows, *shapes[vocab][1:])  # Megatron-Core pads the vocabulary
    params = [(local, shapes[name]) for local, name in canonical.items()]

    def fetch(local: str) -> torch.Tensor:
        source.release()  # what the previous fetch read: the writer is done with it
        return progress.add(owned(source.shard(canonical[local], 1, 0), dtype))

    mcore_io.save_torch_dist(iter_dir, params, fetch, cfg, dtype or model_dtype(source), iteration, spec)
    source.release()


def hf_plan(
    source: Source, family: Family, dtype: torch.dtype | None
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(HF name, dtype, shape) of every tensor to export, from metadata only."""
    plan = []
    fallback = dtype or model_dtype(source)
    for entry, layer in family.expand(source.cfg):
        mcore, hf_names = entry.at(layer)
        metas = entry.to_hf(source.meta(mcore) if mcore else None, source.cfg)
        for name, meta in zip(hf_names, metas, strict=True):
            plan.append((name, dtype or (meta.dtype if mcore else fallback), tuple(meta.shape)))
    return plan


def write_hf(
    source: Source,
    family: Family,
    out_dir: Path,
    progress: Progress,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> None:
    plan = hf_plan(source, family, dtype)
    progress.expect(len(plan))
    dtypes = {name: want for name, want, _ in plan}
    with ShardedSafetensorsWriter(out_dir, plan, max_shard_bytes) as writer:
        for entry, layer in family.expand(source.cfg):
            mcore, hf_names = entry.at(layer)
            progress.shard(mcore or hf_names[0])
            if mcore:
                pieces = source.hf_pieces(mcore, entry)  # views where it can: written with no copy
            else:
                pieces = [[tensor] for tensor in entry.to_hf(None, source.cfg)]
            for name, parts in zip(hf_names, pieces, strict=True):
                writer.write_pieces(name, progress.add_pieces([p.to(dtypes[name]) for p in parts]))
            writer.defer(source.release)  # once written: the writer thread may still read these pages
        writer.close()
