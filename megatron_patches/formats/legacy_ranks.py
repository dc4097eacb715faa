"""Legacy (``torch`` format) checkpoints: one ``model_optim_rng.pt`` per model-parallel rank.

The rank grid as Megatron-LM lays it out (its ``get_checkpoint_name``)::

    ITER/mp_rank_{tp:02d}/model_optim_rng.pt                PP = 1
    ITER/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt       PP > 1
    ITER/mp_rank_{tp:02d}[_{pp:03d}]_{ep:03d}/...           EP > 1 (``_PPP`` left out when PP = 1)

A rank file holds that rank's model state dict (``model``, or ``model0``, ``model1``, ... one per
virtual pipeline chunk) beside the common entries. ``megatron_patches.formats.checkpoint``, the
format's owner, re-exports these names: callers take them from there.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from megatron_patches import safe_load
from megatron_patches.errors import ConfigError
from megatron_patches.formats import param_names
from megatron_patches.formats.megatron_lm_args import ARGS

RANK_FILE = "model_optim_rng.pt"
MODEL = "model"  # the model state dict; model0, model1, ... per virtual pipeline chunk (model_keys)
PIPELINE_LAYERS = "pipeline_layers"  # common-state key: layers per pipeline stage (legacy rank files)
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")  # TT[_PPP][_EEE]


def is_rank_dir_name(name: str) -> bool:
    """Whether ``name`` is a legacy rank directory's (``mp_rank_TT[_PPP][_EEE]``)."""
    return _RANK_DIR.match(name) is not None


def has_rank_dirs(iter_dir: str | Path) -> bool:
    """Whether the checkpoint iteration ``iter_dir`` holds legacy rank directories."""
    return any(is_rank_dir_name(p.name) and p.is_dir() for p in Path(iter_dir).iterdir())


def model_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's keys of the model state dicts (its ``generate_state_dict``): ``model``, or
    ``model0``, ``model1``, ... one per virtual pipeline chunk of the rank (interleaved pipeline)."""
    return [MODEL] if num_chunks == 1 else [f"{MODEL}{chunk}" for chunk in range(num_chunks)]


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """``mp_rank_TT``, ``_PPP`` appended if PP > 1, ``_EEE`` if EP > 1 (Megatron-LM's get_checkpoint_name)."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def rank_file(
    iter_dir: str | Path, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1
) -> Path:
    return Path(iter_dir) / rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size) / RANK_FILE


def legacy_layout(iter_dir: str | Path) -> tuple[int, int]:
    """(TP, PP) of a legacy checkpoint, from its rank directories; every rank must be present."""
    return legacy_grid(iter_dir)[:2]


def legacy_grid(iter_dir: str | Path) -> tuple[int, int, int]:
    """(TP, PP, EP) of a legacy checkpoint, from its rank directories; every rank must be present."""
    ranks = [
        [int(g) for g in m.groups() if g is not None]
        for p in Path(iter_dir).iterdir()
        if (m := _RANK_DIR.match(p.name))
    ]
    tp = 1 + max(r[0] for r in ranks)
    pp, ep = (1 + max(r[k] if len(r) > k else 0 for r in ranks) for k in (1, 2))
    if ep == 1 and pp > 1 and _recorded_stages(Path(iter_dir), pp) == 1:
        pp, ep = 1, pp  # mp_rank_TT_EEE: Megatron-LM leaves out _PPP when PP = 1
    for tp_rank, pp_rank, ep_rank in itertools.product(range(tp), range(pp), range(ep)):
        if not (path := rank_file(iter_dir, tp_rank, pp_rank, pp, ep_rank, ep)).is_file():
            raise ConfigError(f"incomplete checkpoint: {path} is missing")
    return tp, pp, ep


def _recorded_stages(iter_dir: Path, found: int) -> int:
    """PP as mp_rank_00_000 records it (ours: pipeline_layers; Megatron-LM's: args), else ``found``."""
    path = iter_dir / "mp_rank_00_000" / RANK_FILE
    if not path.is_file():
        return found  # the completeness check names it
    state = safe_load.safe_torch_load(path, path, mmap=True)
    if PIPELINE_LAYERS in state:
        return len(state[PIPELINE_LAYERS])
    return getattr(state.get(ARGS), "pipeline_model_parallel_size", None) or found


def load_rank(
    iter_dir: str | Path,
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    mmap: bool = False,
    ep_rank: int = 0,
    ep_size: int = 1,
) -> dict:
    """One legacy rank file, loaded safely (``weights_only``); ``mmap`` reads tensors lazily."""
    path = rank_file(iter_dir, tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    if not path.is_file():
        raise ConfigError(f"checkpoint rank file not found: {path}")
    state = safe_load.safe_torch_load(path, path, mmap=mmap)
    if not isinstance(state, dict) or not (MODEL in state or f"{MODEL}0" in state):
        raise ConfigError(f"{path} has no 'model' (or virtual pipeline 'model0') state dict")
    return state


def model_chunk_count(state: dict) -> int:
    """Model chunks (virtual pipeline stages) a legacy rank file holds: 1, or its ``model0..`` keys."""
    return 1 if MODEL in state else sum(1 for key in state if re.fullmatch(rf"{MODEL}\d+", key))


def chunk_model(state: dict, chunk: int) -> dict:
    """The model state dict of virtual pipeline chunk ``chunk`` of a legacy rank file (``model`` if one)."""
    return state[model_keys(model_chunk_count(state))[chunk]]


def virtual_stage(pp_rank: int, chunk: int, pp_size: int) -> int:
    """Megatron-Core's order of the interleaved pipeline's model pieces: chunk 0 of every PP rank, then
    chunk 1 of every rank, ... (``get_transformer_layer_offset`` with ``vp_stage``)."""
    return chunk * pp_size + pp_rank


def pipeline_layers(iter_dir: str | Path, pp_size: int, ep_size: int = 1) -> list[int]:
    """Layers per pipeline stage of a legacy checkpoint, as its rank files record them."""
    state = load_rank(iter_dir, 0, 0, pp_size, mmap=True, ep_size=ep_size)
    if PIPELINE_LAYERS in state:
        return list(state[PIPELINE_LAYERS])
    # Megatron-LM records no split: count the layers each (virtual) stage's TP rank 0 file holds.
    counts = []
    chunks = model_chunk_count(state)
    for stage in range(pp_size * chunks):
        pp_rank, chunk = stage % pp_size, stage // pp_size  # virtual_stage
        rank_state = (
            state if pp_rank == 0 else load_rank(iter_dir, 0, pp_rank, pp_size, True, ep_size=ep_size)
        )
        model = chunk_model(rank_state, chunk)
        layers = (param_names.split_layer_name(param_names.from_spec(key) or "") for key in model)
        counts.append(len({layer[0] for layer in layers if layer}))
    return counts
