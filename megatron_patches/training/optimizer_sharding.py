"""How the distributed optimizer's state is laid out in a ``torch_dist`` checkpoint.

Megatron-Core 0.16.1 (``DistributedOptimizer.sharded_state_dict``) offers two formats:

* ``fully_reshardable`` (``checkpoint.dist_ckpt_optim_fully_reshardable=true``, Megatron-LM's
  ``--dist-ckpt-optim-fully-reshardable``):
  each DP group gathers its flat buffers at save time and stores the fp32 main params and Adam
  moments in model space, one tensor per parameter under ``optimizer.state.<key>.<param key>``,
  sharded like the parameter itself. A resume may change TP, PP and DP.
* ``dp_reshardable`` (the default, as in Megatron-LM): every rank writes
  its own bucket shards, without the gather (faster saves, no full copy in host memory), but the
  shards follow the DP partition of one TP x PP layout: a resume may change DP only.

The type a checkpoint was written with is recorded as Megatron-LM records it (``content_metadata``,
``dist_checkpointing.save(..., content_metadata=...)``), so a resume loads what was saved whatever
the current default; older checkpoints tell it by their optimizer's ``param_state_sharding_type``.

Loading either format into torch ``AdamW`` (no apex or Transformer Engine) needs the ``step`` fixes
below: :func:`allocate_adam_state` before, :func:`step_kept_aside` during, :func:`restore_adam_steps`
after ``DistributedOptimizer.load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_patches import safe_load
from megatron_patches.compat import require_signature

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer

SHARDING_KEY = "distrib_optim_sharding_type"  # Megatron-Core's metadata key, Megatron-LM's content_metadata
FULLY_RESHARDABLE = "fully_reshardable"
DP_RESHARDABLE = "dp_reshardable"
CONTENT_METADATA = "content_metadata"  # dist_checkpointing's common-state key


def metadata(fully_reshardable: bool) -> dict[str, str]:
    """The ``metadata`` for ``sharded_state_dict`` and the ``content_metadata`` a save records."""
    return {SHARDING_KEY: FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE}


def saved_metadata(common: dict[str, Any]) -> dict[str, str]:
    """The metadata a checkpoint's optimizer state was written with, from its common state.

    Checkpoints written before the record hold ``param_state_sharding_type`` in their optimizer's
    common entries (one dict per inner optimizer of a ``ChainedOptimizer``); else ``dp_reshardable``.
    """
    recorded = (common.get(CONTENT_METADATA) or {}).get(SHARDING_KEY)
    if recorded is None:
        found = {part.get("param_state_sharding_type") for part in _optimizer_parts(common.get("optimizer"))}
        found.discard(None)
        recorded = found.pop() if len(found) == 1 else DP_RESHARDABLE
    return {SHARDING_KEY: recorded}


def _optimizer_parts(entry: Any) -> list[dict]:
    if not isinstance(entry, dict):
        return []
    if "param_state_sharding_type" in entry or "optimizer" in entry:
        return [entry]
    return [part for value in entry.values() for part in _optimizer_parts(value)]


def reshards_model_parallel(meta: dict[str, str]) -> bool:
    """Whether optimizer state saved with ``meta`` loads at another TP/PP."""
    return meta.get(SHARDING_KEY) == FULLY_RESHARDABLE


def common_state_sharding(path: str | Path) -> dict[str, str]:
    """:func:`saved_metadata` of the checkpoint at ``path`` (its common state only)."""
    return saved_metadata(safe_load.load_common(path))


@contextmanager
def step_kept_aside(optimizer: MegatronOptimizer) -> Iterator[None]:
    """Load fully re-shardable state into torch ``AdamW`` whose per-parameter state holds ``step``.

    ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` passes the loaded
    ``param``/``exp_avg``/``exp_avg_sq`` (never ``step``, which lives in the param groups) to
    ``_set_main_param_and_optimizer_states``, which copies every key of the parameter's state:
    without apex or Transformer Engine that state has ``step`` and the copy fails with
    ``KeyError: 'step'``. This hides ``step`` during each copy (per optimizer instance, not the
    class); :func:`restore_adam_steps` then sets the saved value.
    """
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_set_main_param_and_optimizer_states"):
            inner._set_main_param_and_optimizer_states = _without_step(inner)
            patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class's method


def _without_step(inner: Any):
    original = type(inner)._set_main_param_and_optimizer_states
    require_signature(original, ["self", "model_param", "tensors"])  # wrapped as in megatron-core 0.16.1

    def set_states(model_param: Any, tensors: dict) -> None:
        group_index, group_order = inner.model_param_group_index_map[model_param]
        state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(inner, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


def _torch_adams(optimizer: MegatronOptimizer) -> Iterator[MegatronOptimizer]:
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def allocate_adam_state(optimizer: MegatronOptimizer) -> None:
    """Create ``torch.optim.AdamW`` state (moments and ``step``) before a load.

    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads
    ``state_dict()``, which (without apex or TE) asserts that every parameter
    has one ``step``; a fresh torch optimizer has no state yet. Megatron-Core's
    own ``init_state_fn`` makes the moments but no ``step``.
    """
    for inner in _torch_adams(optimizer):
        inner.init_state_fn(inner.optimizer, inner.config)
        for param_state in inner.optimizer.state.values():
            param_state.setdefault("step", torch.zeros((), dtype=torch.float32))


def saved_adam_steps(optimizer: MegatronOptimizer, loaded: dict) -> list[float | None]:
    """The Adam ``step`` each inner optimizer saved (in its ``param_groups``, non-apex path)."""
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    parts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    steps = []
    for part in parts:
        found = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
        steps.append(float(found.pop()) if len(found) == 1 else None)
    return steps


def restore_adam_steps(optimizer: MegatronOptimizer, steps: list[float | None]) -> None:
    """Give every parameter its own, correct Adam ``step`` tensor after a load.

    Without apex or Transformer Engine, ``DistributedOptimizer.load_state_dict``
    (megatron-core 0.16.1) assigns one shared ``step`` tensor to every
    parameter, which ``torch.optim.AdamW`` then increments once per parameter
    per update, and the ``dp_reshardable`` parameter-state load then copies the
    freshly allocated (zero) ``step`` over it: bias correction restarts and the
    resumed run diverges from the uninterrupted one.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner, step in zip(inners, steps, strict=True):
        if step is None or not isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for param_state in inner.optimizer.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32)
