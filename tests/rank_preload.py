"""What every rank of ``tests.dist.run_on_ranks`` imports, imported once per test session.

The ranks fork from a ``multiprocessing`` forkserver that imports this module before its first
fork, so each rank starts with torch, Megatron-Core, the trainer and the converter already loaded;
spawned ranks paid those imports (~4 s of CPU each) on every run. Only imports belong here:
anything that ran (a tensor op, a process group) would be shared by every forked rank. What these
modules read from the environment at import is the session's; a module that a test configures
through environment variables before its ranks start (transformers' HF_* ones) is left out.
"""

from megatron_patches import cpu

cpu.quiet_expected_warnings()  # before Megatron-Core's import-time warnings, as cpu.enable() would

import megatron.core.dist_checkpointing  # noqa: E402, F401
import megatron.core.models.gpt  # noqa: E402, F401
import megatron.core.optimizer  # noqa: E402, F401
import megatron.core.pipeline_parallel  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401

import megatron_patches.training.run  # noqa: E402, F401
import tools.convert.mcore_io  # noqa: E402, F401
