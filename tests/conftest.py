import os

import pytest
import torch

# The suite runs the trainer's CPU runtime on purpose, also on a GPU machine whose torch is a CPU build.
os.environ.setdefault("ALLOW_CPU_TRAINING", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
