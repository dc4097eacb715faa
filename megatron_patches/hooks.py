"""The hook points where patches plug into the training loop, and the patch registry.

The loop (``megatron_patches.training.loop``) calls every enabled hook at fixed
points, in the order the patches are listed in config. A patch is a module
listed in :data:`PATCHES` exposing an ``Options`` dataclass and
``enable(options: Options, config) -> Hook``: :func:`build_hooks` reads
``patches.<name>`` into ``Options`` (unknown keys and wrong types fail with one
line naming the dotted key), ``Options.__post_init__`` checks the values, and
``enable`` checks them against the run's config, all before anything is built.
A patch never imports another patch, nor the trainer: what a hook may use of
the run is :class:`HookContext`. Hooks marked *collective* are called on every
rank, in the same order, so a patch may run a collective inside them; the
others are rank-local.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from megatron_patches.config_io import from_dict
from megatron_patches.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from megatron_patches.formats.model_config import ModelConfig
    from megatron_patches.training.config import Config as TrainConfig

# Patch name in config (`patches: {<name>: {...options}}`) -> module with `enable`.
PATCHES = {
    "channel_loss": "megatron_patches.channel_loss",
    "save_trigger": "megatron_patches.save_trigger",
    "rope_schedule": "megatron_patches.rope_schedule",
    "loss_spike": "megatron_patches.loss_spike",
    "probes": "megatron_patches.probes",
    "moe_load": "megatron_patches.moe_load",
}


class PhaseInfo(Protocol):
    """A span of iterations reading one blend at one sequence length (``training.data.Phase``)."""

    name: str
    start_iteration: int
    end_iteration: int  # exclusive
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    channels: tuple  # channel name of each blend component (dataset_id -> name)

    @property
    def tokens_per_iteration(self) -> int: ...


class ModelObjects(Protocol):
    model: torch.nn.Module  # this rank's model stage, as wrapped for training (DDP)
    gpt: torch.nn.Module  # the same, unwrapped: Megatron-Core's GPTModel
    # With the interleaved pipeline both are ModuleLists of this rank's model chunks, one per virtual
    # stage (parallel.model_chunks lists them); walking .modules() reaches every chunk.
    optimizer: Any  # Megatron-Core's MegatronOptimizer


class MetricsSink(Protocol):
    enabled: bool  # True on the logging rank (the last global rank), which writes

    def console(self, line: str) -> None: ...

    def scalars(self, metrics: dict[str, float], iteration: int) -> None: ...


class RunState(Protocol):
    iteration: int  # iterations completed (0-based number of the one running)
    consumed_samples: int


class HookContext(Protocol):
    """What hooks may read during a run (the loop's ``TrainContext`` is one)."""

    cfg: TrainConfig
    run_dir: Path
    objects: ModelObjects
    writer: MetricsSink
    state: RunState
    phase: PhaseInfo | None  # the phase being trained (set before the first on_phase_start)


@dataclass
class StepReport:
    """One finished iteration, as every rank knows it after ``all_reduce`` of the loss."""

    iteration: int  # 1-based number of the iteration just run
    loss: float  # token-weighted mean loss of the global batch (NaN if unknown)
    tokens: int  # loss tokens of the global batch
    grad_norm: float | None
    lr: float
    skipped: bool
    sample_ids: list = field(default_factory=list)  # this DP rank's sample ids, last stage only
    dataset_ids: list = field(default_factory=list)  # blend component of each of those samples
    flags: dict = field(default_factory=dict)  # "<patch>.<flag>" -> rank 0's answer (rank0_flags), bool
    exit_signals: int = 0  # ranks that have received SIGTERM/SIGUSR1 (megatron_patches.exit_signals)


@dataclass(frozen=True)
class Rollback:
    """Reload, in this process, the newest checkpoint at least ``lookback`` iterations old; continue."""

    reason: str
    # Skip the samples read since that checkpoint plus this many more; None: read them again.
    skip_margin: int | None = 0
    lookback: int = 0  # the checkpoint is at least this many iterations older than the anomaly


@dataclass
class Requests:
    """What hooks ask of the loop at the end of an iteration (already agreed by all ranks)."""

    save: str | None = None  # reason for a checkpoint now
    stop: str | None = None  # reason to end the run cleanly after saving
    # Stop without a checkpoint: the newest one on disk (from before a bad stretch) stays the resume point.
    stop_without_save: bool = False
    rollback: Rollback | None = None  # reload the newest checkpoint instead of saving or stopping


class Hook:
    """Base class: every hook is a no-op; a patch overrides the ones it needs."""

    name = "hook"
    flag_names: tuple[str, ...] = ()  # the yes/no questions ``rank0_flags`` answers each iteration

    def describe(self) -> list[str]:
        """Lines for the start-up summary (``--dry-run`` and the first log lines), e.g. a path to touch."""
        return []

    def plan_phases(self, phases: list[PhaseInfo], config: TrainConfig) -> list[PhaseInfo]:
        """Before anything is built: return the run's data phases, possibly split or changed.

        Phases are frozen dataclasses: change them with ``dataclasses.replace``.
        """
        return phases

    def model_config(self, phase: PhaseInfo, model: ModelConfig) -> ModelConfig:
        """The model that ``phase`` trains, if this patch changes it per phase; else ``model``.

        Checkpoints record it (what their weights were trained as) and a resume
        checks it, so a patch that changes the model mid-run (rope_schedule) says so here.
        """
        return model

    def on_train_start(self, ctx: HookContext) -> None:
        """Collective. After model, optimizer, checkpoint and data are ready."""

    def on_phase_start(self, ctx: HookContext, phase: PhaseInfo) -> None:
        """Collective. Entering ``phase`` (at start-up too, for the phase a resume lands in)."""

    def on_micro_batch_loss(
        self,
        ctx: HookContext,
        token_losses: torch.Tensor,
        loss_mask: torch.Tensor,
        batch: dict[str, torch.Tensor],
        training: bool,
    ) -> None:
        """Last pipeline stage, each micro-batch: per-token losses ``[b, s]`` before reduction."""

    def rank0_flags(self, ctx: HookContext) -> set[str]:
        """Global rank 0 only, every iteration, after forward/backward: which of ``flag_names`` hold.

        For decisions only one rank can take without ranks disagreeing on the
        iteration (the file system, a wall clock). Every rank gets the answer in
        ``after_step`` as ``report.flags["<patch>.<flag>"]`` (a bool), the same on
        every rank after the same iteration (how it travels is the loop's business).
        """
        return set()

    def skip_update(self, ctx: HookContext, loss: float, grad_norm: float | None) -> bool:
        """Collective. After forward/backward, before ``optimizer.step``: True skips the update."""
        return False

    def after_step(self, ctx: HookContext, report: StepReport, requests: Requests) -> None:
        """Collective. After the update; may set ``requests.save`` / ``requests.stop``."""

    def on_log(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        """Collective, every ``log_interval``: add entries to ``metrics`` (logged by the logging rank)."""

    def on_eval(self, ctx: HookContext, metrics: dict[str, float]) -> None:
        """Collective, after each evaluation: add entries to ``metrics``."""

    def after_save(self, ctx: HookContext, path: Path) -> None:
        """Collective, after a checkpoint is complete."""

    def rollback_lookback(self) -> int | None:
        """Iterations a roll-back of this patch may reach back (``Rollback.lookback``), or None if it
        asks for none: pruning by ``checkpoint.keep_last`` spares the checkpoints that needs."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Patch state saved in checkpoints (must be equal on all ranks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def phase_model_config(hooks: list[Hook], phase: PhaseInfo, model: ModelConfig) -> ModelConfig:
    """The model ``phase`` trains: ``model`` as each hook's :meth:`Hook.model_config` changes it."""
    for hook in hooks:
        model = hook.model_config(phase, model)
    return model


def number_option(where: str, value: Any, integer: bool = False, minimum: float = 0.0) -> float | int:
    """A numeric option above ``minimum`` (YAML 1.1 reads ``1e6`` as a string; accept that too).

    For range checks in ``Options.__post_init__``: the types are already checked by
    :func:`build_hooks`, but an option built in code is checked the same way.
    """
    if isinstance(value, str) and not integer:
        with contextlib.suppress(ValueError):
            value = float(value)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind} above {minimum:g}, got {value!r}")
    return value


def run_dir_file(patch: str, key: str, name: Any, run_dir: str) -> Path:
    """Option ``key`` of ``patch`` as a file inside ``run_dir`` (absolute); anything else is a ConfigError."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"patches.{patch}.{key} must be a file name inside run_dir, got {name!r}")
    return Path(run_dir).resolve() / name


def enable_patch(name: str, options: dict[str, Any], config: TrainConfig) -> Hook:
    """Patch ``name`` enabled with ``options`` read into its ``Options``: unknown keys ("did you
    mean"), wrong types and bad values fail with one line naming the dotted key."""
    module = importlib.import_module(PATCHES[name])
    return module.enable(from_dict(module.Options, options, f"patches.{name}."), config)


def build_hooks(patches: dict[str, Any], config: TrainConfig) -> list[Hook]:
    """Enable the patches named in ``config.patches``; unknown names or bad options fail here."""
    hooks = []
    for name, options in patches.items():
        if name not in PATCHES:
            raise ConfigError(f"unknown patch {name!r} in patches; known: {sorted(PATCHES)}")
        if options in (None, False):
            continue
        if options is True:
            options = {}
        if not isinstance(options, dict):
            raise ConfigError(f"patches.{name} must be a mapping of options (or true/false), got {options!r}")
        options = dict(options)
        if options.pop("enabled", True) is False:
            continue
        hooks.append(enable_patch(name, options, config))
    return hooks
