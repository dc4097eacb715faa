"""The blend-file format: `blend.yaml` and `data_path.txt`, written by the data pipeline, read by the trainer.

Every path in blend.yaml is relative to the directory holding it, so a tokenized
directory can move; data_path.txt holds the same list with absolute prefixes,
ready for Megatron-LM's `--data-path $(cat data_path.txt)`. Which weights go in
is the pipeline's business (``data/preprocess/blend.py``); this module only knows
the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_patches import paths
from megatron_patches.errors import ConfigError
from megatron_patches.formats.indexed import DOCUMENT_SUFFIX

BLEND_FILE = "blend.yaml"
DATA_PATH_FILE = "data_path.txt"
_REQUIRED_KEYS = ("data_path", "channels", "tokenizer")


@dataclass(frozen=True)
class TokenizerFacts:
    """What blend.yaml records about the tokenizer that made the ids."""

    path: Path
    eod_id: int
    vocab_size: int
    dtype: str  # numpy dtype name of the .bin files


def blend_document(
    final_dir: Path,
    weights: dict[str, float],
    documents: dict[str, int],
    tokens: dict[str, int],
    tok: TokenizerFacts,
) -> dict:
    """The content of blend.yaml: prefixes relative to `final_dir`, weights, counts, tokenizer."""
    prefixes = {c: f"{c}{DOCUMENT_SUFFIX}" for c in sorted(tokens)}
    data_path: list = []
    for channel, weight in weights.items():
        data_path += [round(weight, 8), prefixes[channel]]
    return {
        "format": "megatron-core-indexed-dataset",
        "paths_relative_to": "this file's directory",
        "data_path": data_path,
        "weights": {c: round(w, 8) for c, w in weights.items()},
        "channels": prefixes,
        "tokens": {c: int(tokens[c]) for c in sorted(tokens)},
        "documents": {c: int(documents[c]) for c in sorted(documents)},
        "tokenizer": os.path.relpath(tok.path.resolve(), final_dir.resolve()),
        "eod_id": int(tok.eod_id),
        "vocab_size": int(tok.vocab_size),
        "dtype": tok.dtype,
    }


def write_blend_files(directory: Path, final_dir: Path, blend: dict) -> None:
    """Write blend.yaml and data_path.txt into `directory` (which the caller renames to `final_dir`)."""
    text = yaml.safe_dump(blend, sort_keys=False, allow_unicode=True)
    paths.write_text_atomic(directory / BLEND_FILE, text)
    data_path = blend["data_path"]
    absolute = " ".join(
        f"{w} {final_dir.resolve() / p}" for w, p in zip(data_path[::2], data_path[1::2], strict=True)
    )
    (directory / DATA_PATH_FILE).write_text(absolute + "\n", encoding="utf-8")


def load_blend(path: Path) -> dict:
    """Read a blend.yaml and resolve its prefixes and tokenizer against its directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"blend file {path} does not exist")
    try:
        blend = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"blend file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(blend, dict):
        raise ConfigError(f"blend file {path} must be a YAML mapping, got {type(blend).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in blend]
    if missing:
        raise ConfigError(
            f"blend file {path} lacks {missing}; write it with `python -m data.preprocess tokenize`"
        )
    base = path.parent
    blend["data_path"] = [
        item if i % 2 == 0 else str(base / item) for i, item in enumerate(blend["data_path"])
    ]
    blend["channels"] = {c: str(base / p) for c, p in blend["channels"].items()}
    blend["tokenizer"] = str((base / blend["tokenizer"]).resolve())
    return blend
