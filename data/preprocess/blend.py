"""`blend.yaml` and `data_path.txt`: which prefixes the trainer reads, with which weights.

Weights come from the configured channel ratios (zh_web: 4, en_web: 4, code: 2 -> 0.4/0.4/0.2),
normalized to sum to 1, or, without ratios, from the token counts (the natural mixture). Every path
in blend.yaml is relative to the directory holding it; data_path.txt holds the same list with
absolute prefixes, ready for Megatron-LM's `--data-path $(cat data_path.txt)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_patches.errors import ConfigError

SUFFIX = "_text_document"


def blend_weights(tokens: dict[str, int], ratios: dict | None) -> dict[str, float]:
    """Normalized weight per channel; channels with ratio 0 are left out."""
    present = {c for c, n in tokens.items() if n > 0}
    if ratios is None:
        total = sum(tokens[c] for c in present)
        return {c: tokens[c] / total for c in sorted(present)} if total else {}
    missing = sorted(present - set(ratios))
    if missing:
        raise ConfigError(f"blend.ratios has no ratio for channel(s) {missing} (give 0 to leave one out)")
    absent = sorted(c for c, r in ratios.items() if r and c not in present)
    if absent:
        raise ConfigError(f"blend.ratios names channel(s) {absent} but no document was labelled so")
    if any(not isinstance(r, int | float) or r < 0 for r in ratios.values()):
        raise ConfigError(f"blend.ratios must be non-negative numbers, got {ratios}")
    total = float(sum(ratios[c] for c in present))
    if total <= 0:
        raise ConfigError("blend.ratios: at least one channel with data needs a positive ratio")
    return {c: ratios[c] / total for c in sorted(present) if ratios[c] > 0}


@dataclass(frozen=True)
class TokenizerFacts:
    """What blend.yaml records about the tokenizer that made the ids."""

    path: Path
    eod_id: int
    vocab_size: int
    dtype: str  # numpy dtype name of the .bin files


def blend_mapping(
    final_dir: Path,
    documents: dict[str, int],
    tokens: dict[str, int],
    ratios: dict | None,
    tok: TokenizerFacts,
) -> dict:
    """The content of blend.yaml: prefixes relative to `final_dir`, weights, counts, tokenizer."""
    weights = blend_weights(tokens, ratios)
    prefixes = {c: f"{c}{SUFFIX}" for c in sorted(tokens)}
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


def write_blend(
    directory: Path,
    final_dir: Path,
    documents: dict[str, int],
    tokens: dict[str, int],
    ratios: dict | None,
    tokenizer: TokenizerFacts,
) -> dict:
    """Write blend.yaml and data_path.txt into `directory` (which becomes `final_dir`)."""
    blend = blend_mapping(final_dir, documents, tokens, ratios, tokenizer)
    with open(directory / "blend.yaml.tmp", "w", encoding="utf-8") as handle:
        yaml.safe_dump(blend, handle, sort_keys=False, allow_unicode=True)
    os.replace(directory / "blend.yaml.tmp", directory / "blend.yaml")
    data_path = blend["data_path"]
    absolute = " ".join(
        f"{w} {final_dir.resolve() / p}" for w, p in zip(data_path[::2], data_path[1::2], strict=True)
    )
    (directory / "data_path.txt").write_text(absolute + "\n", encoding="utf-8")
    return blend


def load_blend(path: Path) -> dict:
    """Read a blend.yaml and resolve its prefixes and tokenizer against its directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"blend file {path} does not exist")
    try:
        blend = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"blend file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    missing = [key for key in ("data_path", "channels", "tokenizer") if key not in (blend or {})]
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
