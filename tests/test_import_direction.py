"""Imports run one way: launch/bench -> rooms (trainer, tools/*, data) -> patches -> bottom layer.

Every ``import`` of every module under megatron_patches, tools, data, launch and bench is
checked, imports inside functions included: a lazy import still couples two rooms.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_patches.hooks import PATCHES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_patches", "tools", "data", "launch", "bench")
# The floor: errors, config I/O, the CPU runtime, layout helpers, formats. Imports nothing above it.
BOTTOM = {
    f"megatron_patches.{name}"
    for name in (
        "errors", "config_io", "cpu", "compat", "parallel", "paths", "safe_load", "lifetime",
        "checkpoint_writers", "flops", "tensorboard_scalars",
    )
}  # fmt: skip
REGISTERED_PATCHES = set(PATCHES.values())
# Libraries under tools/ that several tools share; only tools import them.
TOOL_LIBRARIES = ("tools.hf_runtime",)
# The converter builds a GPTModel through the trainer's model builder, and uses nothing else of it.
CROSSINGS = {("tools/convert", "megatron_patches.training.model"): {"build_model_for_this_rank"}}
# Annotation-only imports (under ``if TYPE_CHECKING:``) allowed against the arrows: a hook
# signature names the run's Config; nothing runs.
TYPE_CHECKING_ONLY = {"megatron_patches.training.config"}


@dataclass(frozen=True)
class Import:
    path: str  # file:line
    source: str  # importing module
    target: str  # imported module (the longest dotted prefix that is a project module)
    names: tuple[str, ...]  # the names taken from it (``from target import names``)
    type_checking: bool


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def room(module: str) -> str:
    """The room a module lives in; imports within one room are free."""
    parts = module.split(".")
    if parts[0] in ("launch", "bench"):
        return "top"
    if parts[0] == "data":
        return "data"
    if parts[0] == "tools":
        return "tools" if len(parts) == 1 else f"tools/{parts[1]}"
    if module == "megatron_patches" or parts[1] == "formats" or module in BOTTOM:
        return "bottom"
    if parts[1] == "training":
        return "training"
    return f"patch:{parts[1]}" if module in REGISTERED_PATCHES else f"patch-layer:{parts[1]}"


def forbidden(source: str, target: str, names: tuple[str, ...]) -> str | None:
    """Why importing ``target`` from ``source`` runs against the arrows, or None if it does not."""
    src, dst = room(source), room(target)
    if src == dst or src == "top" or dst == "bottom":
        return None
    if dst == "top":
        return "nothing imports launch or bench"
    if src == "bottom":
        return "the bottom layer imports only the bottom layer"
    if src.startswith("patch"):
        return _from_patch_layer(source, src, dst)
    if dst.startswith("patch"):
        return None  # the trainer, tools and data may use the patch layer
    if target.startswith(TOOL_LIBRARIES) and src.startswith("tools/"):
        return None
    if set(names) and set(names) <= CROSSINGS.get((src, target), set()):
        return None
    return "trainer, tools/* and data are siblings: none imports another"


def _from_patch_layer(source: str, src: str, dst: str) -> str | None:
    if not dst.startswith("patch"):
        return "a patch imports only the hook API, patch helpers and the bottom layer"
    if source == "megatron_patches.hooks" or dst == "patch-layer:hooks":
        return None  # hooks.py is the registry every patch plugs into
    if src.startswith("patch-layer:"):
        return "a patch helper imports only the bottom layer"
    return "a patch never imports another patch" if dst.startswith("patch:") else None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        for target, names in _targets(node, package, modules):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            found.append(Import(where, module, target, names, node.lineno in guarded))
    return found


def _targets(node: ast.AST, package: str, modules: dict[str, Path]) -> list[tuple[str, tuple[str, ...]]]:
    if isinstance(node, ast.Import):
        return [(_project_prefix(alias.name, modules), ()) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.append(
            (submodule, ()) if submodule in modules else (_project_prefix(base, modules), (alias.name,))
        )
    return found


def _project_prefix(name: str, modules: dict[str, Path]) -> str:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def violations() -> list[str]:
    modules = project_modules()
    found = []
    for module, path in modules.items():
        for imp in imports_of(module, path, modules):
            if imp.target.split(".")[0] not in PACKAGES:
                continue  # megatron.core, torch, ...: every layer may use them
            if imp.target not in modules:
                found.append(f"{imp.path}: imports {imp.target}, which does not exist")
                continue
            reason = forbidden(imp.source, imp.target, imp.names)
            if reason and not (imp.type_checking and imp.target in TYPE_CHECKING_ONLY):
                arrow = f"{room(imp.source)} -> {room(imp.target)}"
                found.append(f"{imp.path}: {arrow} ({imp.target}): {reason}")
    return list(dict.fromkeys(found))  # one line per import statement, not per imported name


def test_imports_run_one_way():
    found = violations()
    assert not found, f"{len(found)} import(s) against the arrows:\n" + "\n".join(found)


def test_the_rules_refuse_each_wrong_arrow():
    """The checker itself: one import per rule, as the modules of this repository name them."""
    assert forbidden("megatron_patches.training.run", "tools.convert.hf_io", ()) is not None
    assert forbidden("megatron_patches.training.validate", "data.preprocess.blend", ("load_blend",))
    assert forbidden("tools.convert.mapping", "megatron_patches.training.model", ("ModelConfig",))
    assert (
        forbidden("tools.convert.mcore_io", "megatron_patches.training.model", ("build_model_for_this_rank",))
        is None
    )
    assert forbidden("tools.eval.bench", "tools.infer.records", ())
    assert forbidden("tools.eval.bench", "tools.hf_runtime.generation", ()) is None
    assert forbidden("megatron_patches.training.run", "tools.hf_runtime.loading", ())
    assert forbidden("data.preprocess.tokenize", "megatron_patches.training.data", ())
    assert forbidden("megatron_patches.probes", "megatron_patches.training.loop", ())
    assert forbidden("megatron_patches.loss_spike", "megatron_patches.channel_loss", ())
    assert forbidden("megatron_patches.loss_spike", "megatron_patches.hooks", ()) is None
    assert forbidden("megatron_patches.parallel", "megatron_patches.training.model", ())
    assert forbidden("megatron_patches.formats.blend", "megatron_patches.hooks", ())
    assert forbidden("data.preprocess.tokenize", "megatron_patches.formats.blend", ()) is None
    assert forbidden("tools.eval.ppl", "launch.demo", ())


def test_relative_imports_resolve_to_their_module():
    modules = project_modules()
    found = imports_of("data.preprocess.tokenize", modules["data.preprocess.tokenize"], modules)
    assert "data.preprocess.blend" in {imp.target for imp in found}


def test_the_model_config_and_the_formats_import_without_megatron():
    """The converter's mapping tables and CLI and the bottom layer's formats load no Megatron-Core.

    Importing Megatron-Core costs seconds; a conversion of HF or legacy files never needs it."""
    formats = sorted(m for m in project_modules() if m.startswith("megatron_patches.formats."))
    modules = ["tools.convert.mapping", "tools.convert.commands", *formats]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
