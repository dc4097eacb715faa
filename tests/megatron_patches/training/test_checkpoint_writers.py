"""A rank killed with SIGKILL while it writes a checkpoint leaves no writer process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.megatron_patches.training.test_train import REPO, tiny_args

# The trainer on one rank; every process it forks or spawns that calls os.fsync (dist_checkpointing's
# writers, once their bucket is written) reports its pid and hangs there, like a stalled file system,
# so the test can kill the rank while the writers are certainly alive.
TRAINER = """
import os, sys, time
from pathlib import Path

def stalled_fsync(fd):
    (Path(sys.argv[1]) / f"writer-{os.getpid()}").touch()
    time.sleep(3600)

if __name__ == "__main__":
    trainer, real_fsync = os.getpid(), os.fsync
    os.fsync = lambda fd: real_fsync(fd) if os.getpid() == trainer else stalled_fsync(fd)
    from megatron_patches.training import run
    run.main(sys.argv[2:])
"""


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # an unreaped zombie holds no memory
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_no_writer_process_survives_a_sigkilled_rank(tmp_path):
    script, markers = tmp_path / "trainer.py", tmp_path / "markers"
    script.write_text(TRAINER)
    markers.mkdir()
    args = tiny_args(tmp_path / "run", [], "data.mock=true", "train.train_iters=3", "save_interval=2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "1"}
    trainer = subprocess.Popen([sys.executable, str(script), str(markers), *args], env=env, cwd=REPO)
    descendants: list[psutil.Process] = []
    try:
        assert _wait_for(lambda: any(markers.iterdir()) or trainer.poll() is not None, 300)
        assert trainer.poll() is None, "the trainer ended before its checkpoint writers were seen"
        descendants = psutil.Process(trainer.pid).children(recursive=True)
        writers = {int(m.name.removeprefix("writer-")) for m in markers.iterdir()}
        assert writers <= {p.pid for p in descendants}
        assert len(descendants) > len(writers)  # the results queue's manager (and resource tracker) too
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=30)
        time.sleep(10)
        survivors = [f"{p.pid} {p.name()}" for p in descendants if _alive(p)]
        assert survivors == [], f"orphaned after the rank was killed: {survivors}"
        assert not (tmp_path / "run" / "checkpoints" / "iter_0000002").exists()  # never looks complete
    finally:
        trainer.kill()
        for proc in descendants:
            if _alive(proc):
                proc.kill()
