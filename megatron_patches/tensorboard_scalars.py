"""Scalars a run logged to TensorBoard, read back as ``{tag: {step: value}}`` with resumes resolved.

``tools.eval trends``, ``tools.scaling`` (final losses of each grid point) and
the demo's loss plot read the trainer's curves through :func:`tensorboard_scalars`.
"""

from __future__ import annotations

from pathlib import Path

from megatron_patches.errors import ConfigError


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag's ``{step: value}`` in the event files under ``log_dir``, steps in order.

    A resumed run writes a new event file that repeats the steps the killed run
    logged past its checkpoint; the value written last (by wall time, then by
    file name, which starts with the file's creation time) is the one kept. The
    trainer opens that file with a purge marker (``SummaryWriter(purge_step=)``),
    which also drops the killed run's steps the resumed run has not reached yet,
    as TensorBoard does.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(Path(log_dir).rglob("*tfevents*"))
    if not files:
        raise ConfigError(f"{log_dir} holds no TensorBoard event files")
    events = [event for path in files for event in EventFileLoader(str(path)).Load()]
    scalars: dict[str, dict[int, float]] = {}
    for event in sorted(events, key=lambda e: e.wall_time):  # stable: file order breaks ties
        if _is_purge_marker(event):  # the steps from here on belong to the resumed run
            for tag, points in scalars.items():
                scalars[tag] = {step: v for step, v in points.items() if step < event.step}
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                scalars.setdefault(value.tag, {})[event.step] = _scalar(value)
    return {tag: dict(sorted(points.items())) for tag, points in scalars.items() if points}


def _is_purge_marker(event) -> bool:
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return event.HasField("session_log") and event.session_log.status == SessionLog.START


def _scalar(value) -> float:
    """A scalar summary's value (the loader hands ``simple_value``s over as 0-d tensors)."""
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(value.tensor))
