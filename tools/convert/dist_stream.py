"""Stream a ``torch_dist`` checkpoint one tensor at a time, never building the model.

Megatron-Core stores every parameter as one global tensor of the TP=1 shape, whatever the
TP/PP it was saved at (TP pieces are chunks with offsets); a decoder parameter is stacked
over the layers (``decoder.layers.<param>``, shape ``[num_layers, ...]``, one chunk or more
per layer)::

    embedding.word_embeddings.weight                       [padded vocab, hidden]
    decoder.layers.self_attention.linear_qkv.weight        [layers, qkv rows, hidden]
    decoder.layers.mlp.linear_fc1.weight                   [layers, 2 * ffn (gate; up), hidden]
    decoder.layers.<linear>._extra_state/shard_<l>_<L>     pickled, one per layer (``[None]``)
    decoder.final_layernorm.weight, output_layer.weight

So one layer's piece of one parameter is a region of one stored tensor: :class:`DistReader`
reads it (through :func:`megatron_patches.safe_load.read_region`), and :func:`save` writes
one valid checkpoint with ``torch.distributed.checkpoint.save`` whose planner asks the
caller for each piece only when the writer reaches it.

Public API: :class:`DistReader`, :func:`save`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _write_item
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future

from megatron_patches import safe_load
from megatron_patches.compat import require_signature
from megatron_patches.formats import checkpoint as ckpt_format
from tools.convert import layout
from tools.convert.dist_views import MappedChunks

LAYERS = "decoder.layers."
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # a trainer's checkpoint also holds optimizer.*
# What Megatron-Core writes beside the shards; dist_checkpointing.load reads it first.
BACKEND_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# Local-spec modules with an ``_extra_state`` per layer; the TE spec loads them too.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
VOCAB_PARAMS = (layout.EMBEDDING, layout.OUTPUT)
SEQUENTIAL_EXPERTS = "mlp.experts.experts."  # SequentialMLP's sharded key for all of a layer's experts
# Weights of Megatron-Core's linear layers (MLPs of routed and shared experts included), each with an
# ``_extra_state`` object.
LINEAR_WEIGHTS = (".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight", ".linear_fc2.weight")
NORM_WEIGHT = "layernorm.weight"  # a TE spec's separate norms: input_/pre_mlp_/q_/k_/kv_/final_layernorm
# Multi-Latent Attention's projections (MLASelfAttention); its local spec maps no norm into them on save.
MLA_WEIGHTS = tuple(
    f".linear_{p}.weight" for p in ("q_proj", "q_down_proj", "q_up_proj", "kv_down_proj", "kv_up_proj")
)
# Private torch API this module builds on, checked at import as megatron_patches.compat does for Megatron.
require_signature(FileSystemWriter._write_data, ["self", "planner", "file_queue"])
require_signature(
    _write_item, ["transforms", "stream", "data", "write_item", "storage_key", "serialization_format"]
)


def _stacked_param(key: str) -> str | None:
    """``<param>`` of a layer-stacked key ``decoder.layers.<param>``; None for any other key."""
    if not key.startswith(LAYERS) or key[len(LAYERS)].isdigit():
        return None
    return key[len(LAYERS) :]


class DistReader:
    """Every model parameter of a ``torch_dist`` checkpoint by local name (global layer numbers).

    ``metas`` costs nothing; :meth:`read` reads one parameter (one layer's region), cast to
    ``dtype``. Vocabulary parameters are cut to ``vocab_rows`` (the TP=1 padding), as a TP=1
    model loads a checkpoint saved with a larger TP's padding.
    """

    def __init__(self, iter_dir: str | Path, dtype: torch.dtype, vocab_rows: int) -> None:
        self.iter_dir, self.dtype = Path(iter_dir), dtype
        self._where: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
        metadata = safe_load.verify_torch_dist(iter_dir).metadata
        self._mapped = MappedChunks(iter_dir, metadata)
        for key, stored in metadata.state_dict_metadata.items():
            if key.startswith(MODEL_PREFIXES) and isinstance(stored, TensorStorageMetadata):
                self._add(key, tuple(stored.size), vocab_rows)

    def _add(self, key: str, size: tuple[int, ...], vocab_rows: int) -> None:
        param = _stacked_param(key)
        if param is None:
            local = layout.from_spec(key)
            if local in VOCAB_PARAMS and size[0] >= vocab_rows:
                size = (vocab_rows, *size[1:])
            if local:
                self._place(local, key, (0,) * len(size), size)
            return
        for layer in range(size[0]):
            if local := layout.from_spec(f"{LAYERS}{layer}.{param}"):
                self._place(local, key, (layer,) + (0,) * (len(size) - 1), (1, *size[1:]))

    def _place(self, local: str, key: str, offsets: tuple[int, ...], size: tuple[int, ...]) -> None:
        """Register ``local``; SequentialMLP's routed experts (``mlp.experts.experts.*``, the expert axis
        after any layer axis, as its ``sharded_state_dict`` stores them) one name per global expert."""
        if SEQUENTIAL_EXPERTS not in local:
            self._where[local] = (key, offsets, size)
            return
        axis = 1 if _stacked_param(key) else 0
        for expert in range(size[axis]):
            name = local.replace(SEQUENTIAL_EXPERTS, f"{layout.LOCAL_EXPERTS}{expert}.")
            where = [list(offsets), list(size)]
            where[0][axis], where[1][axis] = expert, 1
            self._where[name] = (key, tuple(where[0]), tuple(where[1]))

    def metas(self) -> dict[str, torch.Tensor]:
        """Shape and dtype of every parameter as :meth:`read` returns it, no data."""
        return {
            local: torch.empty(self._shape(local), dtype=self.dtype, device="meta") for local in self._where
        }

    def _shape(self, local: str) -> tuple[int, ...]:
        key, _, size = self._where[local]
        leading = int(bool(_stacked_param(key))) + int(layout.split_expert_name(local) is not None)
        return size[leading:]

    def read(self, local: str) -> torch.Tensor:
        """One parameter: a view of the mapped file where it is one stored chunk, else read and copied."""
        key, offsets, size = self._where[local]
        region = self._mapped.view(key, offsets, size, self.dtype)
        if region is None:
            region = torch.empty(size, dtype=self.dtype)
            safe_load.read_region(self.iter_dir, key, offsets, region)
        return region.view(self._shape(local))


class _LazyPlanner(DefaultSavePlanner):
    """Plans from shapes alone; the data of each write item is fetched when the writer reaches it."""

    def __init__(
        self, items: list[WriteItem], fetch: Callable[[WriteItem], torch.Tensor | io.BytesIO]
    ) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items, self.fetch = items, fetch

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        return self.fetch(write_item)


class _SerialWriter(FileSystemWriter):
    """Writes items in plan order and keeps none of them (torch's writer holds each key's last tensor).

    Serially: fetching the next item on a thread while this one is written was measured slower on
    the 7B benchmark (14.7 s against 9.9 s, the system time up 3.5 s: both threads fault pages of
    mapped files in and out of one address space).
    """

    def storage_meta(self) -> StorageMeta:
        meta = super().storage_meta()  # its checkpoint_id is a Path, which no checkpoint reader admits
        return dataclasses.replace(meta, checkpoint_id=str(meta.checkpoint_id))

    def _write_data(self, planner: _LazyPlanner, file_queue) -> Future:  # noqa: ANN001 - torch's queue
        results = []
        while not file_queue.empty():
            path, storage_key, items = file_queue.get_nowait()
            with self.fs.create_stream(path, "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    results.append(
                        _write_item(
                            self.transforms, stream, data, item, storage_key, self.serialization_format
                        )
                    )
                    del data  # before the next item is fetched
        done: Future = Future()
        done.set_result(results)
        return done


def _tensor_item(
    key: str, layer: int | None, shape: tuple[int, ...], layers: int, dtype: torch.dtype
) -> WriteItem:
    """A parameter, or one layer's slice of a stacked one (``layer`` given), as Megatron-Core lays it out."""
    offsets, chunk, size = (0,) * len(shape), shape, shape
    if layer is not None:
        offsets, chunk, size = (layer, *offsets), (1, *shape), (layers, *shape)
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(size),
        ),
    )


def _stored_key(
    local: str, layers: int, experts: int | None, mla: bool = False, te_name: str | None = None
) -> tuple[str, int | None, int]:
    """(checkpoint key, index on its stacked axis or None, that axis' size) of a local-spec parameter
    name with global layer and expert numbers; ``te_name``: its TE-spec name, for a TE checkpoint.

    A dense model's layers are stacked (``decoder.layers.<param>``); an MoE model's are not (its
    layers differ), but each layer's routed experts are, as SequentialMLP's ``sharded_state_dict``
    (TEGroupedMLP's ``sharded_state_dict`` writes the same keys: "interchangeable with SequentialMLP's").
    """
    # The norm names Megatron-Core's local spec saves under (its MLA layer spec keeps the local ones);
    # the TE specs' ``sharded_state_dict_keys_map`` renames no norm, so a TE key is its state-dict name.
    named = te_name or (local if mla else layout.to_spec(local, "te"))
    split = layout.split_layer_name(named)
    if split is None:
        return named, None, 0
    if not experts:
        return LAYERS + split[1], split[0], layers
    expert = layout.split_expert_name(named)
    if expert is None:
        return named, None, 0
    prefix, number, suffix = expert
    layer_prefix = prefix.removesuffix(layout.LOCAL_EXPERTS)
    return layer_prefix + SEQUENTIAL_EXPERTS.removesuffix(".") + suffix, number, experts


def _extra_state_keys(
    params: list[tuple[str, tuple]],
    layers: int,
    experts: int | None,
    mla: bool = False,
    te_names: dict[str, str] | None = None,
) -> list[str]:
    """The ``_extra_state`` objects Megatron-Core saves beside the linear layers' weights (TE: and beside
    its norms' weights; a TENorm saves one too, and an object the model does not ask for is not read)."""
    if not (experts or mla):
        return [
            f"{LAYERS}{module}._extra_state/shard_{layer}_{layers}"
            for layer in range(layers)
            for module in EXTRA_STATE_MODULES
        ]
    keys = []
    weights = LINEAR_WEIGHTS + MLA_WEIGHTS + ((NORM_WEIGHT,) if te_names else ())
    for local, _ in params:
        if local.endswith(weights):
            te_name = te_names and te_names[local]
            key, index, count = _stored_key(local, layers, experts, mla, te_name)
            module = key.removesuffix(".weight").removesuffix(".layer_norm_weight")
            keys.append(f"{module}._extra_state/shard_{index or 0}_{count or 1}")
    return keys


def _extra_state_bytes() -> io.BytesIO:
    """What a local-spec linear layer's ``_extra_state`` ShardedObject holds."""
    buffer = io.BytesIO()
    torch.save([None], buffer)
    return buffer


def save(
    iter_dir: str | Path,
    params: list[tuple[str, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    layers: int,
    dtype: torch.dtype,
    common: dict,
    experts: int | None = None,
    te_names: dict[str, str] | None = None,
) -> None:
    """Write one ``torch_dist`` checkpoint of ``params`` (local name, TP=1 shape), in that order.

    ``fetch(local)`` gives each tensor when the writer reaches it, and the writer keeps none:
    memory stays at the tensor being written, however large the model.
    """
    iter_dir = Path(iter_dir)
    iter_dir.mkdir(parents=True, exist_ok=True)
    by_index, items = {}, []
    mla = any(local.endswith(MLA_WEIGHTS) for local, _ in params)
    for local, shape in params:
        key, index, count = _stored_key(local, layers, experts, mla, te_names and te_names[local])
        items.append(_tensor_item(key, index, shape, count, dtype))
        by_index[items[-1].index] = local
    # A fused norm's module (TE: linear_qkv) is also a linear's: one object each, in first-seen order.
    for key in dict.fromkeys(_extra_state_keys(params, layers, experts, mla, te_names)):
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))

    def resolve(item: WriteItem) -> torch.Tensor | io.BytesIO:
        if item.type == WriteItemType.BYTE_IO:
            return _extra_state_bytes()
        return fetch(by_index[item.index]).to(dtype).view(item.tensor_data.chunk.sizes)  # a layer: [1, ...]

    writer = _SerialWriter(str(iter_dir), sync_files=False)  # no fsync, as the legacy format's torch.save
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp_save({}, storage_writer=writer, planner=_LazyPlanner(items, resolve), no_dist=True)
    torch.save(common, iter_dir / safe_load.COMMON_FILE)
    (iter_dir / ckpt_format.DIST_MARKER).write_text(json.dumps(BACKEND_CONFIG))
