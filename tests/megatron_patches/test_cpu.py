"""The CPU runtime rewrites exactly the CUDA assumptions Megatron-Core makes."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_patches import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is off on GPU machines")

PROBE = r"""
import torch
from megatron_patches import cpu
assert cpu.enable() and cpu.enable()
t = torch.zeros(3, device="cuda")
assert t.device.type == "cpu"
assert torch.ones(2).cuda().device.type == "cpu"
assert torch.ones(2).to("cuda:0").device.type == "cpu"
assert torch.ones(2).to(torch.cuda.current_device()).device.type == "cpu"
assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
assert torch.ones(2).type() == "torch.cuda.FloatTensor"
assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
assert torch.ones(2).type(torch.float64).dtype == torch.float64
torch.cuda.synchronize()
with torch.cuda.stream(torch.cuda.Stream()):
    pass
torch.cuda.manual_seed(7)
a = torch.rand(4)
torch.manual_seed(7)
assert torch.equal(a, torch.rand(4)), "the CUDA seed must drive the CPU generator"
from megatron.core.tensor_parallel import random as mp_random
state = mp_random._get_cuda_rng_state()
b = torch.rand(4)
mp_random._set_cuda_rng_state(state)
assert torch.equal(b, torch.rand(4)), "saved RNG state must restore the CPU generator"
print("ok")
"""


def test_cpu_runtime_rewrites_cuda_calls():
    # A fresh interpreter: enable() changes process-wide state.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rng_tracker_forks_are_isolated_streams():
    out = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CPU RNG state changed" not in out.stderr


FORK_PROBE = r"""
import torch
from megatron_patches import cpu
cpu.enable()
from megatron.core.tensor_parallel import random as mp_random
mp_random.initialize_rng_tracker(force_reset=True)
tracker = mp_random.get_cuda_rng_tracker()
tracker.reset()
torch.manual_seed(1)
tracker.add("model-parallel-rng", 99)
outside_before = torch.rand(3)
torch.manual_seed(1)
with tracker.fork():
    inside = torch.rand(3)
outside_after = torch.rand(3)
assert torch.equal(outside_before, outside_after), "a fork must not advance the default stream"
torch.manual_seed(99)
assert torch.equal(inside, torch.rand(3)), "a fork draws from its own seeded stream"
"""


def test_training_on_cpu_torch_is_refused_where_nvidia_smi_lists_gpus(tmp_path, monkeypatch):
    # A CPU torch wheel on a GPU node: the trainer (its dry run too) stops with one line saying how to fix it.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA H100'\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_CPU_TRAINING"}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "megatron_patches.training", "--dry-run", f"run_dir={tmp_path / 'run'}"]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"megatron_patches.training: error: nvidia-smi lists 2 GPU(s) but torch {torch.__version__} in "
        f"{sys.executable} sees no CUDA device: install a CUDA build of torch there (or run with "
        "PYTHON=<a CUDA interpreter>), or set ALLOW_CPU_TRAINING=1 to train on CPU on purpose"
    ]
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("ALLOW_CPU_TRAINING", "1")  # the deliberate override
    cpu.refuse_hidden_gpus()
    monkeypatch.delenv("ALLOW_CPU_TRAINING")
    monkeypatch.setenv("PATH", str(tmp_path / "no-driver"))  # no nvidia-smi: a CPU machine
    cpu.refuse_hidden_gpus()


def test_backward_passes_run_inside_the_cpu_runtime():
    # Activation recompute re-runs forward code (device="cuda" masks) during backward: every
    # backward entry point must keep the CUDA-to-CPU rewrites on, with its arguments honoured.
    out = subprocess.run([sys.executable, "-c", BACKWARD_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


BACKWARD_PROBE = r"""
import torch
from megatron_patches import cpu
cpu.enable()


class MaskInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.ones(grad.shape, device="cuda")  # what a recomputed causal mask does


x = torch.ones(3, requires_grad=True)
torch.autograd.backward(MaskInBackward.apply(x).sum())
assert torch.equal(x.grad, torch.ones(3)), x.grad
y = MaskInBackward.apply(x)
y.backward(torch.full((3,), 2.0), retain_graph=True)
y.backward(torch.full((3,), 2.0))  # the retained graph runs again
assert torch.equal(x.grad, torch.full((3,), 5.0)), x.grad
w = torch.ones(2, requires_grad=True)
torch.autograd.backward([(MaskInBackward.apply(x) * 3).sum() + (w * 4).sum()], inputs=[w])
assert torch.equal(x.grad, torch.full((3,), 5.0)) and torch.equal(w.grad, torch.full((2,), 4.0))
print("ok")
"""
