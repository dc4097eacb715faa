"""Whole-config validation, before any rank builds anything.

:func:`plan_run` checks every section against the others and against the
files it names (data prefixes and their ``.idx`` headers, blend files, the
checkpoint to resume or start from), enables the patches (which check their
own options), and returns the resolved plan. Every rank computes the same plan
from the same inputs, so a bad config stops all ranks with the same one line.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats import megatron_lm_args
from megatron_patches.formats.blend import load_blend
from megatron_patches.formats.indexed import check_prefix
from megatron_patches.formats.model_config import ModelConfig
from megatron_patches.hooks import Hook, build_hooks, number_option, phase_model_config
from megatron_patches.parallel import Layout, validate_layout, virtual_pipeline_size
from megatron_patches.paths import refuse_overlap
from megatron_patches.training import checkpoint, data_plan, optimizer_sharding, rollback
from megatron_patches.training.config import Config
from megatron_patches.training.data import (
    Phase,
    channel_names,
    parse_blend,
    phase_at,
    plan_phases,
    samples_before,
    split_weights,
)
from megatron_patches.training.model import resolve_transformer_impl
from megatron_patches.training.parallel_options import check_parallel_options, resolve_sequence_parallel
from megatron_patches.training.run_settings import check_allow_change, check_resume, run_settings
from megatron_patches.training.schedules import validate_schedule


@dataclass
class ResolvedData:
    data_path: list  # [w1, prefix1, ...], prefixes resolved to paths and checked on disk
    anneal_data_path: list
    channels: dict  # channel name -> prefix
    eod_id: int
    tokenizer: str | None  # HF tokenizer directory, when known (copied beside checkpoints)


@dataclass
class RunPlan:
    layout: Layout
    data: ResolvedData
    phases: list[Phase]
    hooks: list[Hook]
    save_dir: Path
    resume_from: Path | None
    pretrained: Path | None
    settings: dict = field(default_factory=dict)  # run_settings: stored in every checkpoint
    notes: list = field(default_factory=list)  # lines for the log (e.g. changes allow_change admitted)
    skipped: list = field(default_factory=list)  # skip_windows: data.skip_samples and the checkpoint's


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    save_dir, resume_from, pretrained = _find_checkpoints(cfg)
    given = _given_model_config(cfg)
    if cfg.checkpoint.use_checkpoint_args and (resume_from or pretrained):
        cfg.model = checkpoint.model_config_from(resume_from or pretrained, cfg.model, given)
    cfg.model = resolve_transformer_impl(cfg.model)  # every later step sees local or transformer_engine
    par = cfg.parallel
    vpp = virtual_pipeline_size(
        cfg.model.num_layers,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
        par.num_layers_per_virtual_pipeline_stage,
    )
    layout = Layout(
        world_size,
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        vpp,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
    )
    validate_layout(layout, cfg.model)
    _check_train(cfg, layout)
    _check_unsupported(cfg)
    cfg.parallel.sequence_parallel = resolve_sequence_parallel(
        cfg.parallel.sequence_parallel,
        layout.tensor_model_parallel_size,
        torch.cuda.is_available(),
        moe=cfg.model.num_moe_experts is not None,
    )
    validate_schedule(cfg.optimizer, cfg.train.train_iters)
    data = _resolve_data(cfg)
    check_allow_change(cfg.checkpoint.allow_change)
    settings = run_settings(cfg, data.data_path, data.anneal_data_path, data.tokenizer, data.eod_id)
    hooks = build_hooks(cfg.patches, cfg)
    phases = _plan_phases(cfg, data, hooks)
    for phase in phases:
        _check_batch(phase.global_batch_size, phase.micro_batch_size, layout, f"phase {phase.name!r}")
        _check_seq(phase.seq_length, cfg)
    check_parallel_options(cfg, layout, [phase.seq_length for phase in phases])
    data_plan.check_max_epochs(data_plan.channel_uses(phases, cfg.data.split), cfg.data.max_epochs)
    notes = []
    if resume_from is not None:
        checkpoint.check_architecture(resume_from, _model_at(resume_from, phases, hooks, cfg))
        relayout = _check_resume_layout(resume_from, layout) + _check_resume_chunks(resume_from, layout)
        saved = checkpoint.saved_settings(resume_from)
        notes = relayout + check_resume(resume_from, saved, settings, cfg.checkpoint.allow_change)
        _check_data_position(resume_from, phases)
    skipped = rollback.planned_windows(cfg.data.skip_samples, resume_from, phases)
    if pretrained is not None:
        checkpoint.check_architecture(pretrained, cfg.model, given)
        tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
        vpp, ep = layout.virtual_pipeline_model_parallel_size, layout.expert_model_parallel_size
        checkpoint.check_pretrained_layout(pretrained, tp, pp, cfg.model.num_layers, vpp, ep)
    return RunPlan(layout, data, phases, hooks, save_dir, resume_from, pretrained, settings, notes, skipped)


def _find_checkpoints(cfg: Config) -> tuple[Path, Path | None, Path | None]:
    """(save dir, checkpoint to resume, release to start from); a resume wins over pretrained.

    ``checkpoint.load`` naming a directory without a checkpoint is a mistake,
    not a fresh start, unless it is the save directory (a job's first launch).
    """
    save_dir = Path(cfg.checkpoint.save or Path(cfg.run_dir) / "checkpoints")
    # The run writes into both and prunes old checkpoints in save_dir: a start checkpoint there could be lost.
    refuse_overlap(
        {"run_dir": cfg.run_dir, "checkpoint.save": save_dir},
        {"checkpoint.pretrained_checkpoint": cfg.checkpoint.pretrained_checkpoint},
    )
    load = cfg.checkpoint.load
    resume_from = ckpt_format.latest(load or save_dir)
    if cfg.checkpoint.load_iteration is not None:
        number_option("checkpoint.load_iteration", cfg.checkpoint.load_iteration, integer=True, minimum=-1)
        root = Path(load or save_dir)
        keep_last = cfg.checkpoint.keep_last
        resume_from = rollback.resume_point(root, save_dir, cfg.checkpoint.load_iteration, keep_last)
    if load and resume_from is None and Path(load).resolve() != save_dir.resolve():
        raise ConfigError(
            f"checkpoint.load {load} holds no checkpoint (no {ckpt_format.TRACKER_FILE}); "
            "unset it to start from scratch"
        )
    pretrained = _find_pretrained(cfg) if resume_from is None else None
    return save_dir, resume_from, pretrained


def _plan_phases(cfg: Config, data: ResolvedData, hooks: list[Hook]) -> list[Phase]:
    """The data phases (main, anneal), named by channel, then as each patch reshapes them."""
    phases = plan_phases(
        cfg.train.train_iters,
        data.data_path,
        cfg.data.seq_length,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        cfg.data.anneal_fraction,
        data.anneal_data_path,
    )
    phases = [
        dataclasses.replace(p, channels=tuple(channel_names(p.data_path, data.channels))) for p in phases
    ]
    for hook in hooks:
        phases = hook.plan_phases(phases, cfg)
    return phases


def _check_resume_chunks(path: Path, layout: Layout) -> list[str]:
    """Another virtual pipeline size regroups each rank's parameters into other model chunks (and DDP
    buckets): the model tensors are keyed by global layer, the optimizer state must be fully_reshardable."""
    saved, mine = checkpoint.saved_virtual_pipeline(path), layout.virtual_pipeline_model_parallel_size
    if (saved or 1) == (mine or 1):
        return []
    if not optimizer_sharding.reshards_model_parallel(optimizer_sharding.common_state_sharding(path)):
        raise ConfigError(
            f"checkpoint {path} was saved at virtual_pipeline_model_parallel_size={saved} with "
            f"dp_reshardable optimizer state, which loads at the same VPP only (this run: {mine}); "
            "resume with the checkpoint's VPP (runs saved with "
            "checkpoint.dist_ckpt_optim_fully_reshardable=true resume at any layout)"
        )
    return [f"resume: model chunks per PP rank {saved or 1} -> {mine or 1} (fully_reshardable optimizer)"]


def _check_resume_layout(path: Path, layout: Layout) -> list[str]:
    """The log line of a resume at another layout; one line refusing what its optimizer state cannot do.

    Any DP change loads; another TP/PP needs ``fully_reshardable`` optimizer state (optimizer_sharding).
    What would change the run (global batch, seed, data, model shape) is refused elsewhere: the data
    position is global (consumed samples), so it does not depend on the layout.
    """
    saved, saved_dp = checkpoint.saved_layout(path), checkpoint.saved_data_parallel_size(path)
    mine = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size)
    dp = layout.data_parallel_size
    if saved is None or (saved == mine and saved_dp in (None, dp)):
        return []
    if saved != mine and not optimizer_sharding.reshards_model_parallel(
        optimizer_sharding.common_state_sharding(path)
    ):
        raise ConfigError(
            f"checkpoint {path} was saved at TP={saved[0]} PP={saved[1]} with dp_reshardable optimizer "
            f"state, which loads at another DP only (this run: TP={mine[0]} PP={mine[1]}); resume at "
            f"TP={saved[0]} PP={saved[1]}, or start a new run from its weights with "
            "checkpoint.pretrained_checkpoint (runs saved with "
            "checkpoint.dist_ckpt_optim_fully_reshardable=true resume at any layout)"
        )
    old = f"TP{saved[0]}×PP{saved[1]}×DP{saved_dp or '?'}"
    line = f"resume: resuming a {old} checkpoint at TP{mine[0]}×PP{mine[1]}×DP{dp}"
    if saved == mine:
        return [f"{line}; every rank takes DP rank 0's RNG streams"]
    return [
        f"{line}; optimizer state re-sharded (fully_reshardable); RNG streams restart from seed + "
        "iteration, so dropout masks differ from the old layout's"
    ]


def _check_data_position(path: Path, phases: list[Phase]) -> None:
    """The data position is a function of the iteration; a resume must agree with the checkpoint's.

    A changed ``global_batch_size`` (or phase plan) would re-read or skip samples.
    """
    saved = checkpoint.saved_progress(path)
    expected = samples_before(phases, saved.iteration)
    if saved.consumed_samples != expected:
        raise ConfigError(
            f"checkpoint {path} consumed {saved.consumed_samples} samples in {saved.iteration} "
            f"iterations but this config's batch sizes put that iteration at sample {expected}, "
            "so the resume would re-read or skip data; keep the global_batch_size the run started with"
        )


def _model_at(path: Path, phases: list[Phase], hooks: list[Hook], cfg: Config) -> ModelConfig:
    """The model config the checkpoint at ``path`` should hold: that of the phase that wrote it.

    A patch may change the model per phase (rope_schedule's rotary base); a checkpoint
    records the model its weights were trained as, i.e. that of the iteration before it.
    """
    iteration = ckpt_format.iteration_of(path)
    if not isinstance(iteration, int):  # a release: written by the converter, not by a phase
        return cfg.model
    return phase_model_config(hooks, phase_at(phases, max(iteration - 1, 0)), cfg.model)


def _check_train(cfg: Config, layout: Layout) -> None:
    train, log = cfg.train, cfg.logging
    for name, value in (
        ("train_iters", train.train_iters),
        ("micro_batch_size", train.micro_batch_size),
        ("global_batch_size", train.global_batch_size),
        ("log_interval", log.log_interval),
        ("seq_length", cfg.data.seq_length),
        ("keep_last", cfg.checkpoint.keep_last),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if train.manual_gc_interval < 0:
        raise ConfigError(f"manual_gc_interval must be >= 0, got {train.manual_gc_interval}")
    _check_batch(train.global_batch_size, train.micro_batch_size, layout, "train")
    if not 0 <= cfg.data.anneal_fraction < 1:
        raise ConfigError(f"data.anneal_fraction must be in [0, 1), got {cfg.data.anneal_fraction}")
    _check_eval(cfg)


def _check_eval(cfg: Config) -> None:
    log = cfg.logging
    valid_weight = split_weights(cfg.data.split)[1]
    if log.eval_interval is None:
        return
    if log.eval_interval < 1 or log.eval_iters < 1:
        raise ConfigError(
            f"eval_interval ({log.eval_interval}) and eval_iters ({log.eval_iters}) must be >= 1"
        )
    if valid_weight == 0:
        raise ConfigError(
            f"logging.eval_interval is set but data.split {cfg.data.split!r} leaves no validation data; "
            "give it a share (e.g. data.split=99,1,0) or unset logging.eval_interval"
        )


def _check_unsupported(cfg: Config) -> None:
    """Megatron-LM options this trainer does not implement: refused when set, never silently ignored."""
    if cfg.checkpoint.async_save:
        raise ConfigError(
            "checkpoint.async_save=true is not supported: checkpoints are written synchronously "
            "(dist_checkpointing.save, then an atomic rename); remove it"
        )
    if cfg.data.reset_attention_mask and cfg.model.transformer_impl != "local":
        raise ConfigError(
            "data.reset_attention_mask=true needs model.transformer_impl=local: Transformer Engine's "
            "causal attention ignores the document mask, so packed documents would still see each other"
        )


def _check_batch(global_batch: int, micro_batch: int, layout: Layout, where: str) -> None:
    per_step = micro_batch * layout.data_parallel_size
    if global_batch % per_step:
        raise ConfigError(
            f"{where}: global_batch_size ({global_batch}) is not divisible by micro_batch_size x DP "
            f"= {micro_batch} x {layout.data_parallel_size} = {per_step}"
        )
    pp = layout.pipeline_model_parallel_size
    if layout.virtual_pipeline_model_parallel_size and (global_batch // per_step) % pp:
        # Megatron-Core's interleaved schedule runs micro-batches in groups of PP per model chunk
        raise ConfigError(
            f"{where}: the interleaved pipeline needs micro-batches per iteration (global_batch_size / "
            f"(micro_batch_size x DP) = {global_batch // per_step}) to be a multiple of PP ({pp})"
        )


def _check_seq(seq_length: int, cfg: Config) -> None:
    if seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"seq_length ({seq_length}) exceeds model.max_position_embeddings "
            f"({cfg.model.max_position_embeddings})"
        )


def _resolve_data(cfg: Config) -> ResolvedData:
    """Blend, channels, EOD id and tokenizer from the data section (and its blend.yaml)."""
    data = cfg.data
    data_path, channels, eod_id, tokenizer, blend_vocab = (
        list(data.data_path),
        dict(data.channels),
        data.eod_id,
        data.tokenizer,
        None,
    )
    if data.blend:
        blend = load_blend(Path(data.blend))
        data_path = data_path or blend["data_path"]
        channels = channels or blend.get("channels", {})
        eod_id = eod_id if eod_id is not None else blend.get("eod_id")
        tokenizer = tokenizer or blend["tokenizer"]
        blend_vocab = blend.get("vocab_size")
        _check_vocab(blend_vocab, f"blend {data.blend}", cfg)
    if tokenizer and (data.tokenizer or blend_vocab is None):
        _check_vocab(len(_load_tokenizer(tokenizer)), f"tokenizer {tokenizer}", cfg)
    if data.mock:
        return ResolvedData([], [], {}, cfg.model.vocab_size - 1, tokenizer)
    if not data_path:
        raise ConfigError("no training data: set data.data_path, data.blend, or data.mock=true")
    if eod_id is None:
        eod_id = _tokenizer_eod(tokenizer)
    for path in (data_path, data.anneal_data_path):
        for prefix in parse_blend(path)[0] if path else []:
            check_prefix(prefix)
    if data.anneal_fraction > 0 and not data.anneal_data_path:
        raise ConfigError("data.anneal_fraction > 0 needs data.anneal_data_path")
    return ResolvedData(data_path, list(data.anneal_data_path), channels, eod_id, tokenizer)


def _check_vocab(needed: int | None, source: str, cfg: Config) -> None:
    if needed is not None and needed > cfg.model.vocab_size:
        raise ConfigError(
            f"{source} needs vocab_size {needed} but model.vocab_size is {cfg.model.vocab_size}"
        )


@functools.lru_cache(maxsize=4)
def _load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise ConfigError(f"tokenizer directory {tokenizer_dir} does not exist")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tokenizer_eod(tokenizer_dir: str | None) -> int:
    if not tokenizer_dir:
        raise ConfigError("the end-of-document id is unknown: set data.eod_id, data.tokenizer or data.blend")
    tokenizer = _load_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer_dir} has no eos token; set data.eod_id")
    return int(tokenizer.eos_token_id)


def _given_model_config(cfg: Config) -> ModelConfig | None:
    """checkpoint.pretrained_model_config: the architecture of a checkpoint that records none."""
    path = cfg.checkpoint.pretrained_model_config
    return megatron_lm_args.read_model_config_file(path) if path else None


def _find_pretrained(cfg: Config) -> Path | None:
    if not cfg.checkpoint.pretrained_checkpoint:
        return None
    root = Path(cfg.checkpoint.pretrained_checkpoint)
    path = ckpt_format.latest(root)
    if path is None:
        raise ConfigError(f"pretrained_checkpoint {root} has no {ckpt_format.TRACKER_FILE}")
    return path
