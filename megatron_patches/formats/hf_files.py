"""Which files of a HuggingFace-style directory are weights, tokenizer, or data-pipeline bookkeeping.

The converter (``tools/convert``) copies them into exports and the trainer copies
a run's tokenizer beside its checkpoints; both use these lists so that an export
and a checkpoint carry the same files.
"""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

from megatron_patches.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# data.preprocess's bookkeeping beside a tokenizer (stage report, cache fingerprint, the ids its own
# encoder reads): it describes the data pipeline, not the model, so no export carries it.
PIPELINE_FILES = ("report.json", "fingerprint.json", "tokenizer_info.json")
# What an HF tokenizer is made of: transformers' own files, the vocabulary files of the common
# tokenizer classes and remote tokenization code. A tokenizer source contributes these only.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "*.model", "*.tiktoken", "vocab.json", "vocab.txt",
    "merges.txt", "tokenization_*.py",
)  # fmt: skip


def side_files(directory: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Top-level files of an HF directory other than weights: config, tokenizer, remote code, ..."""
    found = []
    for path in sorted(Path(directory).iterdir()):
        weights = path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")
        if path.is_file() and not path.name.startswith(".") and not weights and path.name not in skip:
            found.append(path)
    return found


def copy_side_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for path in side_files(source, skip):
        shutil.copyfile(path, Path(target) / path.name)
        copied.append(path.name)
    return copied


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """The files of ``source`` that make up its HF tokenizer, and nothing else of that directory."""
    if not Path(source).is_dir():
        raise ConfigError(f"tokenizer {source} is not a directory")
    wanted = [p for p in side_files(source) if any(fnmatch(p.name, name) for name in TOKENIZER_FILES)]
    if not wanted:
        raise ConfigError(f"tokenizer {source} holds no HF tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for path in wanted:
        shutil.copyfile(path, Path(target) / path.name)
    return [path.name for path in wanted]
