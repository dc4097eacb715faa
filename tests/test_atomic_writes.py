"""Every rename-into-place in the project goes through megatron_patches.paths' atomic helpers.

One helper means one place that gets "never leave half-written output that
looks complete" right (temporary names, cleanup on failure, dead owners'
leftovers). bench/ is not scanned: a benchmark writes throwaway inputs into its
own scratch directory, never an output another command reads.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("megatron_patches", "tools", "data", "launch")
HELPER = REPO / "megatron_patches" / "paths.py"
RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def _renames_in(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if (owner, node.func.attr) in RENAMES or node.func.attr == "rename":  # Path.rename
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_no_rename_into_place_outside_the_atomic_helpers():
    modules = [p for room in SCANNED for p in sorted((REPO / room).rglob("*.py")) if p != HELPER]
    assert len(modules) > 50  # the scan found the project
    offenders = [hit for path in modules for hit in _renames_in(path)]
    assert offenders == [], "use megatron_patches.paths.atomic_dir/atomic_file/write_*_atomic:\n" + "\n".join(
        offenders
    )
