"""N model replicas, each on its own device group, draining one shared work queue.

``--devices 0,1,2,3,4,5,6,7 --replicas 4`` gives groups (0,1) (2,3) (4,5) (6,7):
each replica process sees only its group (``CUDA_VISIBLE_DEVICES``) and holds
the model on one GPU, or spread over its GPUs with ``device_map="auto"`` (8x1,
4x2, 2x4 or 1x8 on a node). On CPU every replica uses an equal share of the
cores. The parent puts batches of prompts on the queue in input order, the
replicas take the next batch when free, and the parent writes results in input
order as they become contiguous (``records.OrderedWriter``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_patches.errors import ConfigError
from tools.hf_runtime.generation import Sampling, generate
from tools.infer.records import OrderedWriter

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ReplicaSpec:
    model: str
    tokenizer: str
    dtype: str
    sampling: Sampling
    batch_size: int
    prompt_key: str
    threads: int
    trust_remote_code: bool = False


def parse_devices(text: str | None) -> list[str]:
    """``"0,1,2,3"`` -> GPU indices; ``"cpu"`` (the default without CUDA) -> ``["cpu"]``.

    Indices count the GPUs this process sees, as ``cuda:N`` does: with
    ``CUDA_VISIBLE_DEVICES=4,5,6,7`` set, ``0`` is physical GPU 4 (see :func:`physical_group`).
    """
    if text is None:
        return [str(i) for i in range(torch.cuda.device_count())] or ["cpu"]
    if text.strip() == "cpu":
        return ["cpu"]
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items) or len(set(items)) != len(items):
        raise ConfigError(f"--devices must be 'cpu' or distinct GPU indices like 0,1,2,3; got {text!r}")
    return items


def device_groups(devices: list[str], replicas: int) -> list[tuple[str, ...]]:
    if replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {replicas}")
    if devices == ["cpu"]:
        return [("cpu",)] * replicas
    if len(devices) % replicas:
        raise ConfigError(f"{len(devices)} devices cannot be split evenly into {replicas} replicas")
    size = len(devices) // replicas
    return [tuple(devices[i * size : (i + 1) * size]) for i in range(replicas)]


def physical_group(group: tuple[str, ...], visible: str | None) -> tuple[str, ...]:
    """The entries a child's ``CUDA_VISIBLE_DEVICES`` needs for ``group`` (indices this process sees).

    A child's ``CUDA_VISIBLE_DEVICES`` names devices as the driver does, so index ``i`` becomes the
    parent's i-th visible entry (a physical index or a ``GPU-``/``MIG-`` UUID) when the parent
    has a ``CUDA_VISIBLE_DEVICES`` of its own, and stays ``i`` when it has none.
    """
    if group == ("cpu",) or visible is None:
        return group
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    beyond = [index for index in group if int(index) >= len(entries)]
    if beyond:
        raise ConfigError(
            f"--devices names GPU {beyond[0]} but CUDA_VISIBLE_DEVICES={visible!r} shows "
            f"{len(entries)} GPU(s); indices count the visible GPUs from 0"
        )
    return tuple(entries[int(index)] for index in group)


def load_replica(spec: ReplicaSpec, gpus: int) -> PreTrainedModel:
    """The model on this process's devices: CPU, one GPU, or spread over ``gpus`` GPUs."""
    from transformers import AutoModelForCausalLM

    from tools.hf_runtime.loading import DTYPES, load_model

    if gpus <= 1:
        device = "cuda:0" if gpus else "cpu"
        return load_model(spec.model, spec.dtype, device, trust_remote_code=spec.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        spec.model, dtype=DTYPES[spec.dtype], device_map="auto", trust_remote_code=spec.trust_remote_code
    )
    return model.eval()


def _replica_main(spec: ReplicaSpec, gpus: int, tasks, results, parent_pid: int) -> None:
    try:
        from tools.hf_runtime.loading import load_tokenizer

        torch.set_num_threads(spec.threads)
        model = load_replica(spec, gpus)
        tokenizer = load_tokenizer(spec.tokenizer, spec.trust_remote_code)
        while True:
            try:
                batch = tasks.get(timeout=2)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the parent was killed: do not run on forever
                    return
                continue
            if batch is None:
                return
            positions, records = zip(*batch, strict=True)
            prompts = [record[spec.prompt_key] for record in records]
            outputs = generate(model, tokenizer, prompts, spec.sampling, spec.batch_size, positions)
            results.put(("done", [{**r, "output": o} for r, o in zip(records, outputs, strict=True)]))
    except BaseException:  # noqa: BLE001 - the parent must learn why a replica stopped
        results.put(("error", traceback.format_exc()))


@contextlib.contextmanager
def _visible_devices(group: tuple[str, ...]):
    """Spawned children inherit the environment at start: show them only their group."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if group != ("cpu",):
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical_group(group, old))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def run_replicas(
    spec: ReplicaSpec,
    groups: list[tuple[str, ...]],
    pending: list[tuple[int, dict]],
    writer: OrderedWriter,
) -> None:
    """Generate for every pending (position in the whole input, record) with one process per
    device group; write in order. Positions seed sampling, so outputs do not depend on groups."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for group in groups:  # an index beyond the visible GPUs fails before any replica starts
        physical_group(group, visible)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for start in range(0, len(pending), spec.batch_size):
        tasks.put(pending[start : start + spec.batch_size])
    for _ in groups:
        tasks.put(None)
    procs = [_start_replica(ctx, spec, group, tasks, results) for group in groups]
    try:
        _collect(procs, results, writer, len(pending))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


def _start_replica(ctx, spec: ReplicaSpec, group: tuple[str, ...], tasks, results) -> mp.Process:
    """One replica process that sees only ``group``'s devices."""
    gpus = 0 if group == ("cpu",) else len(group)
    with _visible_devices(group):
        proc = ctx.Process(target=_replica_main, args=(spec, gpus, tasks, results, os.getpid()))
        proc.start()
    return proc


def _collect(procs, results, writer: OrderedWriter, total: int) -> None:
    written = 0
    while not writer.finished:
        try:
            kind, payload = results.get(timeout=1)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or all(p.exitcode == 0 for p in procs):
                raise RuntimeError(
                    f"replicas {dead} died ({total - written} prompts left unanswered)"
                ) from None
            continue
        if kind == "error":
            raise RuntimeError(f"a replica failed:\n{payload}")
        before = written
        for record in payload:
            written += writer.add(record)
        if written > before:
            print(f"\r{written}/{total} written", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
