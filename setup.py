"""Build step that keeps the generic top-level names ``tools`` and ``data`` out of site-packages.

Everything else is declared in ``pyproject.toml``. A wheel puts the project's packages under one
directory that cannot be imported (``megatron_pipeline_cli.PACKAGES_DIR``); the console entry points
put that directory on the path. An editable install (``pip install -e .``, what ``make install`` does)
is left as it is: it maps the names to the repository's folders.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the build backend does not put it there
from megatron_pipeline_cli import PACKAGES_DIR  # noqa: E402


class BuildPyUnderPackagesDir(build_py):
    """``build_py`` that moves every package (not the entry-point module) into ``PACKAGES_DIR``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode or not self.packages:
            return
        build_lib = Path(self.build_lib)
        for name in sorted({package.split(".")[0] for package in self.packages}):
            target = build_lib / PACKAGES_DIR / name
            shutil.rmtree(target, ignore_errors=True)  # a previous build's copy
            target.parent.mkdir(parents=True, exist_ok=True)
            (build_lib / name).rename(target)


setup(cmdclass={"build_py": BuildPyUnderPackagesDir})
