"""Run a function on N gloo ranks in fresh processes, as a pytest helper.

``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes,
initializes ``torch.distributed`` with gloo on a free port, turns on the CPU
runtime, calls ``fn(*args)`` on every rank and returns the per-rank results in
rank order. A rank that raises fails the caller with that rank's traceback; a
run that exceeds ``timeout`` kills every rank and fails, so a test never hangs.
``fn`` must be a module-level function (the ranks import it by name).

Without CUDA the ranks fork from a forkserver that imported ``tests.rank_preload`` (torch, Megatron-Core,
the trainer) once per session instead of each rank importing them afresh; a rank gets the caller's
environment, working directory, stdout and stderr (pytest's capture, ``capfd``) as a spawned one would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

import torch

from megatron_patches.parallel import free_port


class RankFailure(AssertionError):
    """A rank raised, or the run timed out; the message holds the traceback."""


class _CallerFd:
    """Pickled into a rank's arguments, the caller's file descriptor ``fd`` goes along with the rank
    (``multiprocessing.reduction.DupFd``); the rank gets an object whose ``detach()`` returns its copy."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _passed_on, (reduction.DupFd(self.fd),)


def _passed_on(dup_fd):
    return dup_fd


def _adopt(caller: tuple) -> None:
    """Take the caller's environment, stdout and stderr: a forkserver's child has those of the
    server's start, and the test may have changed its own since (monkeypatch.setenv, capfd)."""
    environ, outputs = caller
    os.environ.clear()
    os.environ.update(environ)
    for target, output in zip((1, 2), outputs, strict=True):
        fd = output.detach()
        if fd != target:  # a spawned child inherits them under their own numbers
            os.dup2(fd, target)
            os.close(fd)


def _rank_main(
    rank: int, world_size: int, port: int, caller: tuple, fn: Callable, args: tuple, results
) -> None:
    _adopt(caller)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        import torch

        from megatron_patches import cpu

        torch.set_num_threads(1)
        cpu.enable()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle: the queue's own pickler would share tensor storage through
        # file descriptors that die with this process, which may exit first.
        value = pickle.dumps(fn(*args))
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
        return
    _shutdown()


def _shutdown() -> None:
    import torch
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _context() -> mp.context.BaseContext:
    """A forkserver preloaded with ``tests.rank_preload`` on CPU; spawn with CUDA, whose runtime a forked
    child cannot use once the parent initialized it (the preload's imports may)."""
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.rank_preload"])  # takes effect when the server starts
    return ctx


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    caller = (dict(os.environ), (_CallerFd(1), _CallerFd(2)))
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, caller, fn, args, results), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    finished = False
    try:
        values = _collect(procs, results, world_size, time.monotonic() + timeout, timeout)
        finished = True
        return values
    finally:
        _stop(procs, grace=60 if finished else 0)


def _stop(procs, grace: float) -> None:
    """Let ranks exit normally (they own worker processes, e.g. dist_checkpointing's
    writer manager, that only a normal exit shuts down); kill what is left."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 0))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)


def _collect(procs, results, world_size: int, deadline: float, timeout: float) -> list[Any]:
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise RankFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            _raise_if_died(procs, values)
            continue
        if not ok:
            raise RankFailure(f"rank {rank} of {world_size} failed:\n{value}")
        values[rank] = pickle.loads(value)
    return [values[rank] for rank in range(world_size)]


def _raise_if_died(procs, values: dict[int, Any]) -> None:
    for rank, proc in enumerate(procs):
        if rank not in values and proc.exitcode not in (None, 0):
            raise RankFailure(f"rank {rank} died with exit code {proc.exitcode} and no traceback")
