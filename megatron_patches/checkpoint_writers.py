"""dist_checkpointing's writer processes die with the training rank that started them.

A ``torch_dist`` save in megatron-core 0.16.1 (``FileSystemWriterAsync``, synchronous saves
included) starts processes that outlive a rank killed with SIGKILL, with parent 1, forever:

* once per rank, a ``multiprocessing`` manager server holding the write-results queue
  (``filesystem_async._get_write_results_queue``): a spawned interpreter that re-imports the
  trainer, ~270 MB, kept for the rank's whole life;
* during each save, one forked writer per write bucket (``FileSystemWriterAsync.write_preloaded_data``),
  which would go on writing into a checkpoint nobody will finish.

:func:`bind_to_this_process` makes both ask the kernel for SIGKILL when their parent exits
(:func:`megatron_patches.lifetime.die_with_parent`): the manager is started here, with that as its
initializer, and put where Megatron-Core looks for it (the module's ``_results_queue``, created
on first use only), and the writer function is wrapped to call it first. The names are checked at
import against the pinned release.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.managers import SyncManager

from megatron_patches.compat import PINNED_MEGATRON_CORE, MegatronVersionError, require_signature
from megatron_patches.lifetime import die_with_parent


def _check_pinned_api() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    require_signature(filesystem_async._get_write_results_queue, [])
    require_signature(
        filesystem_async.FileSystemWriterAsync.write_preloaded_data,
        ["transform_list", "local_proc_idx", "write_bucket", "results_queue", "count_queue", "use_fsync"],
    )
    if not hasattr(filesystem_async, "_results_queue"):  # the cache _get_write_results_queue fills
        pin = f"megatron-core=={PINNED_MEGATRON_CORE}"
        raise MegatronVersionError(f"{filesystem_async.__name__} has no _results_queue; install {pin}")


_check_pinned_api()
_bound_pid: int | None = None  # the process whose writers are bound (a forked child must bind its own)


def bind_to_this_process() -> None:
    """Make this process's checkpoint writer processes die with it; call before its first save."""
    global _bound_pid
    if _bound_pid == os.getpid():
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=get_context("spawn"))  # the context Megatron-Core's own manager uses
        manager.start(initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    writer = filesystem_async.FileSystemWriterAsync
    if not getattr(writer.write_preloaded_data, "dies_with_parent", False):
        writer.write_preloaded_data = staticmethod(_dying_with_parent(writer.write_preloaded_data))
    _bound_pid = os.getpid()


def _dying_with_parent(write: Callable) -> Callable:
    @functools.wraps(write)
    def write_preloaded_data(*args, **kwargs):
        die_with_parent()  # runs in the forked writer: its parent is the saving process
        return write(*args, **kwargs)

    write_preloaded_data.dies_with_parent = True
    return write_preloaded_data
