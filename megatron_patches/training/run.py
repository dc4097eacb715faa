"""``python -m megatron_patches.training --config CONFIG.yaml [key=value ...]``.

Order matters: the config is parsed and validated (files included, patches
enabled) on every rank before the process group exists, so a bad config ends
every rank at once with one line; only then are Megatron-Core's parallel state,
model, optimizer, checkpoint and data built.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from megatron_patches import cpu, parallel, paths
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats.hf_files import copy_tokenizer_files
from megatron_patches.formats.indexed import token_count
from megatron_patches.training import builder, checkpoint, data_plan, finished, memory_budget
from megatron_patches.training.config import Config, load_config
from megatron_patches.training.data import DatasetTokenizer, PhaseData, channel_names, parse_blend
from megatron_patches.training.loop import TrainContext, Trainer
from megatron_patches.training.metrics import MetricsWriter
from megatron_patches.training.model import describe_fused_kernels
from megatron_patches.training.startup import StartupTimer
from megatron_patches.training.validate import RunPlan, plan_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_patches.training", description=__doc__)
    parser.add_argument("--config", help="YAML config (launch/configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.train_iters=100 lr=3e-4"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan, build nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu.refuse_hidden_gpus()  # before anything is planned: the dry run on a GPU node says it too
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", 1))
    plan = plan_run(cfg, world)
    budget = cfg.train.gpu_memory_gb or memory_budget.device_memory_gb()
    memory_budget.check_fits(cfg, plan.layout, plan.phases, budget)  # every rank refuses the same plan
    if args.dry_run:
        print(describe(cfg, plan))
        return 0
    return train(cfg, plan)


def describe(cfg: Config, plan: RunPlan) -> str:
    model = cfg.model
    attention = "sdpa" if model.attention_backend == "auto" else model.attention_backend  # model.layer_spec
    spec = model.transformer_impl + (f" ({attention} attention)" if model.transformer_impl == "local" else "")
    lines = [
        f"layout: {plan.layout.describe()}",
        f"transformer: {spec}",
        describe_fused_kernels(model),
        f"run dir: {Path(cfg.run_dir).resolve()}",
    ]
    lines += [
        f"phase {p.name}: iterations {p.start_iteration}..{p.end_iteration - 1}, seq {p.seq_length}, "
        f"global batch {p.global_batch_size}, channels {list(p.channels)}"
        for p in plan.phases
    ]
    lines += memory_budget.describe_run(cfg, plan.layout, plan.phases)
    lines += describe_data(plan)
    lines += data_plan.describe(data_plan.channel_uses(plan.phases, cfg.data.split))
    lines.append(f"resume from: {plan.resume_from or plan.pretrained or 'scratch'}")
    lines += plan.notes  # e.g. a setting checkpoint.allow_change lets this resume change
    lines += [line for hook in plan.hooks for line in hook.describe()]  # e.g. the file to touch
    lines.append("checkpoint and stop: SIGTERM or SIGUSR1 to any rank (preemption)")
    return "\n".join(lines)


def describe_data(plan: RunPlan) -> list[str]:
    """One line per blend component: channel, weight, tokens on disk, prefix (mock data says so)."""
    lines = []
    for label, data_path in (("data", plan.data.data_path), ("anneal data", plan.data.anneal_data_path)):
        if not data_path:
            continue
        names = channel_names(data_path, plan.data.channels)
        for name, prefix, weight in zip(names, *parse_blend(data_path), strict=True):
            lines.append(f"{label} {name}: weight {weight:g}, {token_count(prefix):,} tokens, {prefix}")
    return lines or ["data: mock (random tokens, data.mock=true): nothing is learned from it"]


def train(cfg: Config, plan: RunPlan) -> int:
    """Build everything on this rank and run; returns the exit code."""
    startup = StartupTimer()
    with startup.phase("process groups"):
        rank, world = parallel.init_distributed()
    run_dir = Path(cfg.run_dir)
    logging_rank = rank == world - 1  # holds the last pipeline stage, where the loss is
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        finished.clear(run_dir)  # until this start reaches train_iters (a requeued Slurm job checks)
        _keep_tokenizer(plan)
        _report_checkpoint_leftovers(plan.save_dir)
    torch.distributed.barrier()
    with startup.phase("process groups"):
        parallel.initialize(plan.layout, cfg.seed, cfg.model)
    with startup.phase("model build"):
        objects = builder.build(cfg)
    with startup.phase("checkpoint load"):
        state = _restore(cfg, plan, objects)
    state.run_settings = plan.settings  # the checkpoints this run writes record its own settings
    if cfg.checkpoint.load_iteration is not None:  # a relaunch then continues this branch (rollback.py)
        state.branched_from = cfg.checkpoint.load_iteration
    writer = MetricsWriter(run_dir, cfg.logging, logging_rank, cfg.to_dict(), state.iteration)
    writer.console(describe(cfg, plan).replace("\n", "\n    "))
    ctx = TrainContext(cfg, run_dir, objects, _phase_data(cfg, plan), writer, state)
    try:
        trainer = Trainer(ctx, plan.hooks, plan.save_dir)
        trainer.startup = startup
        return trainer.run()
    finally:
        writer.close()
        _shutdown()


def _keep_tokenizer(plan: RunPlan) -> None:
    """Copy the tokenizer beside the checkpoints, so `tools.convert mcore2hf` exports a complete HF dir.

    Only the tokenizer's files, as the converter's ``--tokenizer`` copies them: data/preprocess
    bookkeeping beside it (stage report, fingerprint, tokenizer_info.json) is not part of a model.
    """
    if plan.data.tokenizer and not (plan.save_dir / "tokenizer_config.json").exists():
        plan.save_dir.mkdir(parents=True, exist_ok=True)
        copy_tokenizer_files(Path(plan.data.tokenizer), plan.save_dir)


def _report_checkpoint_leftovers(save_dir: Path) -> None:
    """Rank 0 before the run's first save: what earlier saves left in ``save_dir``, removed or named."""
    line = ckpt_format.describe_leftovers(save_dir, ckpt_format.clean_leftovers(save_dir))
    if line:
        print(line, file=sys.stderr, flush=True)


def _restore(cfg: Config, plan: RunPlan, objects) -> checkpoint.TrainState:
    if plan.resume_from is not None:
        state = checkpoint.load(
            plan.resume_from, objects.gpt, objects.optimizer, objects.scheduler, cfg.model, cfg.seed
        )
        for hook in plan.hooks:
            hook.load_state_dict((state.patch_state or {}).get(hook.name, {}))
        return state
    if plan.pretrained is not None:
        checkpoint.start_from_pretrained(plan.pretrained, objects.gpt, objects.optimizer, cfg.model)
    return checkpoint.TrainState()


def _phase_data(cfg: Config, plan: RunPlan) -> PhaseData:
    from megatron.core import parallel_state as ps

    tokenizer = DatasetTokenizer(plan.data.eod_id, cfg.model.vocab_size)
    cache = cfg.data.data_cache_path or str(Path(cfg.run_dir) / "data_cache")
    return PhaseData(
        plan.phases,
        cfg.data,
        tokenizer,
        cfg.seed,
        cache,
        cfg.logging.eval_iters if cfg.logging.eval_interval else 0,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
        plan.skipped,
    )


def _shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
