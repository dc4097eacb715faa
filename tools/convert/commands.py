"""The four conversions. Each validates everything first, then writes into a temporary directory
that is renamed to the output only when complete. Each returns its one-line summary.

They are plain functions (``hf2mcore(hf, out, tp=4, pp=2)``) so tests and
scripts call them without the CLI; keyword names are the CLI's flags.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats.hf_files import PIPELINE_FILES, copy_side_files, copy_tokenizer_files
from megatron_patches.formats.megatron_lm_args import read_model_config_file
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.paths import atomic_dir, refuse_overlap
from tools.convert import layout
from tools.convert.families import Family, default_family, family_named, family_of
from tools.convert.hf_io import make_portable, read_json
from tools.convert.progress import Progress
from tools.convert.sources import HFSource, McoreSource, Source
from tools.convert.writers import model_dtype, rank_count, write_hf, write_mcore

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 << 30
# Fields an --hf-config template must agree on with the checkpoint's model_config.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "groups", "head_dim")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is not None and name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES.get(name)


@dataclass(frozen=True)
class Run:
    """One command's output directory and how it reports."""

    command: str
    out: Path
    force: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class MegatronTarget:
    """The Megatron checkpoint to write: layout, format, key names, dtype."""

    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel (MoE)
    etp: int | None = None  # expert tensor parallel: each routed expert split over TP (None) or not (1)
    fmt: str = "torch"
    spec: str = "local"
    moe_grouped_gemm: bool = False  # --spec te: routed experts as TEGroupedMLP's linear_fc<n>.weight<i>
    dtype: str | None = None
    first: int | None = None  # uneven PP: layers of the first / last stage
    last: int | None = None
    vpp: int | None = None  # virtual pipeline stages per PP rank: rank files hold model0, model1, ...

    def pipeline(self, cfg: ModelConfig) -> layout.Pipeline:
        """Validate everything about the target for ``cfg``; nothing is written before this."""
        if self.fmt not in ckpt_format.FORMATS:
            raise ConfigError(f"--format must be one of {ckpt_format.FORMATS}, got {self.fmt!r}")
        if self.spec not in layout.SPECS:
            raise ConfigError(f"--spec must be one of {layout.SPECS}, got {self.spec!r}")
        spec_names_differ = cfg.num_moe_experts or cfg.multi_latent_attention  # TE's sharded keys rename
        if self.fmt == "torch_dist" and self.spec != "local" and not spec_names_differ:
            raise ConfigError(
                "--spec applies to --format torch; torch_dist checkpoints load into either spec"
            )
        parse_dtype(self.dtype)
        self._check_grouped(cfg)
        return layout.plan_layout(cfg, self.tp, self.pp, self.first, self.last, self.ep, self.etp, self.vpp)

    def _check_grouped(self, cfg: ModelConfig) -> None:
        """Grouped GEMM names exist for TE's TEGroupedMLP only; the legacy GroupedMLP (``weight1`` /
        ``weight2``: experts concatenated, transposed) is not mapped. torch_dist keys are alike either way."""
        if not self.moe_grouped_gemm:
            return
        if not cfg.num_moe_experts:
            raise ConfigError(
                "--moe-grouped-gemm needs an MoE model; this one is dense (num_moe_experts unset)"
            )
        if self.spec != "te":
            raise ConfigError(
                "--moe-grouped-gemm is supported with --spec te only (TEGroupedMLP); the local spec's "
                "legacy GroupedMLP layout is not"
            )


def _to_mcore(source: Source, side_dir: Path, run: Run, target: MegatronTarget) -> str:
    pipeline = target.pipeline(source.cfg)
    source.check()
    iteration = getattr(source, "iteration", 0)  # a re-shard keeps the number; "release" reads as 0
    iteration = iteration if isinstance(iteration, int) else 0
    writes = rank_count(source, target.tp, pipeline, target.ep)
    total = len(source.names()) if target.fmt == "torch_dist" else writes
    progress = Progress(run.command, total, run.quiet)
    with atomic_dir(run.out, run.force, writers="conversions") as tmp:
        copy_side_files(side_dir, tmp, skip=(ckpt_format.TRACKER_FILE,))
        dtype = parse_dtype(target.dtype)
        iter_dir = tmp / ckpt_format.RELEASE
        formats = (target.fmt, target.spec, dtype, iteration, target.ep, target.etp, target.moe_grouped_gemm)
        write_mcore(source, iter_dir, target.tp, pipeline, progress, *formats)
        ckpt_format.write_tracker(tmp, ckpt_format.RELEASE)
    return progress.summary()


def hf2mcore(
    hf: str | Path, out: str | Path, *, force: bool = False, quiet: bool = False, **target: Any
) -> str:
    """HF directory -> Megatron ``release`` checkpoint; ``target`` holds :class:`MegatronTarget` fields."""
    refuse_overlap({"--out": out}, {"--hf": hf})
    source = HFSource(hf)
    return _to_mcore(
        source, source.ckpt.dir, Run("hf2mcore", Path(out), force, quiet), MegatronTarget(**target)
    )


def mcore2mcore(
    mcore: str | Path,
    out: str | Path,
    *,
    iteration: int | str | None = None,
    model_config: str | None = None,
    force: bool = False,
    quiet: bool = False,
    **target: Any,
) -> str:
    """Re-shard a Megatron checkpoint (legacy or torch_dist) to a ``release`` at a new layout."""
    refuse_overlap({"--out": out}, {"--mcore": mcore})
    source = _mcore_source(mcore, iteration, model_config)
    return _to_mcore(
        source, source.root, Run("mcore2mcore", Path(out), force, quiet), MegatronTarget(**target)
    )


def _mcore_source(mcore: str | Path, iteration: int | str | None, model_config: str | None) -> McoreSource:
    """The checkpoint to read; ``--model-config`` (YAML or Megatron-LM argument list) for one without args."""
    given = read_model_config_file(model_config) if model_config else None
    return McoreSource(mcore, iteration, given)


def _export(
    source: Source,
    family: Family,
    config: dict | Future[dict],
    side_dirs: list[str | Path],
    run: Run,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    tokenizer: str | Path | None = None,
) -> str:
    family.expand(source.cfg)  # fails here, before writing, if the family cannot hold the model
    progress = Progress(run.command, 0, run.quiet)
    with atomic_dir(run.out, run.force, writers="conversions") as tmp:
        for side_dir in side_dirs:
            copy_side_files(side_dir, tmp, skip=("config.json", ckpt_format.TRACKER_FILE, *PIPELINE_FILES))
        if tokenizer:
            copy_tokenizer_files(Path(tokenizer), tmp)
        write_hf(source, family, tmp, progress, dtype, max_shard_bytes)
        config = config.result() if isinstance(config, Future) else config  # a rejection leaves no output
        make_portable(tmp, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return progress.summary()


def tokenizer_ids(directory: str) -> dict:
    """bos/eos/pad ids and size of an HF tokenizer directory, for a config derived from model_config."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer in {directory}: {str(err).splitlines()[0]}") from None
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None} | {"tokenizer_size": len(tok)}


def _base_config(source: McoreSource, hf_config: str | None, tokenizer: str | None) -> dict:
    """The config.json template: --hf-config's, the checkpoint's side file, or ids from --tokenizer."""
    if hf_config:
        return read_json(Path(hf_config) / "config.json", "--hf-config config.json")
    if (source.root / "config.json").is_file():
        return read_json(source.root / "config.json", "config.json")
    if tokenizer is None and (source.root / "tokenizer_config.json").is_file():
        tokenizer = str(source.root)  # a training run keeps its tokenizer beside its checkpoints
    base = tokenizer_ids(tokenizer) if tokenizer else {}
    size = base.pop("tokenizer_size", 0)
    if size > source.cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {size} tokens but the model's vocab_size is {source.cfg.vocab_size}"
        )
    return base


def _check_template(base: dict, family: Family, cfg: ModelConfig) -> None:
    """A config.json template of the same family must describe the same shapes as the weights."""
    if "architectures" not in base or family_of(base) is not family:
        return
    template = family.read_config(base)
    for name in (*_SHAPE_FIELDS, "vocab_size"):
        if getattr(template, name) != getattr(cfg, name):
            raise ConfigError(
                f"config.json template has {name}={getattr(template, name)} "
                f"but the checkpoint has {getattr(cfg, name)}"
            )


def _export_family(name: str | None, base: dict, cfg: ModelConfig) -> Family:
    """--family if given, else the template config's family, else the one a from-scratch model exports as."""
    if name:
        return family_named(name)
    return family_of(base) if "architectures" in base else default_family(cfg)


def mcore2hf(
    mcore: str | Path,
    out: str | Path,
    *,
    iteration: int | str | None = None,
    hf_config: str | None = None,
    tokenizer: str | None = None,
    family: str | None = None,
    model_config: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    quiet: bool = False,
) -> str:
    """Megatron checkpoint (legacy or torch_dist) -> complete HF directory."""
    # An iteration directory's root may hold the output (tools.eval converts into <root>/hf/): an --out
    # that is or contains the root also contains the iteration, so that is refused all the same.
    refuse_overlap({"--out": out}, {"--mcore": mcore, "--hf-config": hf_config, "--tokenizer": tokenizer})
    source = _mcore_source(mcore, iteration, model_config)
    source.check()
    base = _base_config(source, hf_config, tokenizer)
    chosen = _export_family(family, base, source.cfg)
    _check_template(base, chosen, source.cfg)
    out_dtype = parse_dtype(dtype)
    side_dirs = [source.root, *([hf_config] if hf_config else [])]
    run = Run("mcore2hf", Path(out), force, quiet)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # transformers' import and its check of config.json (~2 s) run beside the tensor export, which
        # needs neither; the export's temp directory is renamed only once the config is accepted.
        config = pool.submit(chosen.write_config, source.cfg, base, out_dtype or model_dtype(source))
        return _export(source, chosen, config, side_dirs, run, out_dtype, max_shard_bytes, tokenizer)


def hf2hf(
    hf: str | Path,
    out: str | Path,
    *,
    to: str,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    quiet: bool = False,
) -> str:
    """One family's HF checkpoint saved as another's (e.g. Qwen2 as LlamaForCausalLM with attention_bias)."""
    refuse_overlap({"--out": out}, {"--hf": hf})
    source = HFSource(hf)
    target = family_named(to)
    source.check()
    out_dtype = parse_dtype(dtype)
    config = target.write_config(source.cfg, source.ckpt.config, out_dtype or model_dtype(source))
    run = Run("hf2hf", Path(out), force, quiet)
    return _export(source, target, config, [source.ckpt.dir], run, out_dtype, max_shard_bytes)
