"""Typed dataclass configs from YAML mappings: the one loader the trainer and data/preprocess share.

:func:`from_dict` builds a (nested) dataclass from a plain mapping, checking
every key and value against the dataclass fields and their type hints, so a
typo, a wrong type or a missing required key stops with one line naming the
dotted key; a ``list[<dataclass>]`` field is read item by item (``key[i].``). Fields whose
metadata says ``{"config": False}`` are not read from the mapping (e.g. a
directory the loader fills in itself).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_patches.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (empty file: ``{}``), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    node = raw
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {name} is not a section")
    node[leaf] = value


def config_fields(cls: type) -> list[str]:
    """Names of ``cls``'s fields that a config mapping may set."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def from_dict(cls: type, values: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``values``, checking names and types recursively."""
    if values is None:
        values = {}
    section = where.removesuffix(".") or cls.__name__
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section} must be a mapping, got {values!r}")
    names = config_fields(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{suggest(key, names)}")
        kwargs[key] = _field_value(field_type(cls, key), value, path)
    missing = [name for name in required_fields(cls) if name not in kwargs]
    if missing:
        raise ConfigError(f"config section {section} needs {', '.join(missing)}")
    return cls(**kwargs)


def _field_value(kind: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, f"{path}.")
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        item = args[0]
        if not isinstance(value, list):
            raise ConfigError(f"config key {path!r} expects a list of mappings, got {value!r}")
        return [from_dict(item, entry, f"{path}[{i}].") for i, entry in enumerate(value)]
    return coerce(value, kind, path)


def required_fields(cls: type) -> list[str]:
    """Fields of ``cls`` without a default: a mapping must set them."""
    missing = dataclasses.MISSING
    needed = [f for f in dataclasses.fields(cls) if f.default is missing and f.default_factory is missing]
    return [f.name for f in needed if f.metadata.get("config", True)]


def coerce(value: Any, kind: Any, path: str) -> Any:
    """``value`` as the type hint ``kind`` allows, or a one-line error naming ``path``."""
    allowed = allowed_types(kind)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; every Megatron user writes it so.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tuple(t for t in allowed if t is not type(None))):
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"config key {path!r} expects {type_name(kind)}, got {value!r}")
        return value
    raise ConfigError(f"config key {path!r} expects {type_name(kind)}, got {value!r}")


def allowed_types(kind: Any) -> tuple[type, ...]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return tuple(t for arg in typing.get_args(kind) for t in allowed_types(arg))
    origin = typing.get_origin(kind)
    return (origin or kind,)


def type_name(kind: Any) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in allowed_types(kind))


def suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
