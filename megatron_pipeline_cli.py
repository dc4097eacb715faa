"""Console entry points (``mcore-convert``, ``mcore-preprocess``, ``mcore-train``, ``mcore-eval``,
``mcore-infer``): each runs one room's ``__main__`` exactly as ``python -m <room>`` would.

The project's code imports itself by the names of its top-level folders (``tools``, ``data``,
``megatron_patches``). ``tools`` and ``data`` are names many other repositories use too (Megatron-LM
has a ``tools`` package), so an installed wheel keeps those folders out of site-packages' top level,
in :data:`PACKAGES_DIR` (see ``setup.py``). An entry point puts that directory first on ``sys.path``
and on ``PYTHONPATH`` (so subprocesses such as ``python -m tools.convert`` find the same code), then
runs the room. In a repository checkout (editable install) the folders sit next to this file.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

PACKAGES_DIR = "megatron-pipeline-packages"  # not an identifier: nothing can import it by mistake


def code_root() -> Path:
    """The directory holding ``tools/``, ``data/`` and ``megatron_patches/``."""
    here = Path(__file__).resolve().parent
    installed = here / PACKAGES_DIR
    return installed if installed.is_dir() else here


def put_code_root_first() -> None:
    """:func:`code_root` first on this process's path and on its subprocesses' (``PYTHONPATH``)."""
    root = str(code_root())
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def _run(module: str) -> None:
    put_code_root_first()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def convert() -> None:
    _run("tools.convert")


def preprocess() -> None:
    _run("data.preprocess")


def train() -> None:
    _run("megatron_patches.training")


def evaluate() -> None:
    _run("tools.eval")


def infer() -> None:
    _run("tools.infer")
