"""The trainer end to end on gloo ranks: learning, exact resume, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training import run
from megatron_patches.training.config import load_config
from megatron_patches.training.validate import plan_run
from tests.dist import run_on_ranks
from tests.megatron_patches.training.corpus import EOD, write_corpus

REPO = Path(__file__).resolve().parents[3]

TINY_MODEL = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=128",
    "model.max_position_embeddings=64",
]


def tiny_args(run_dir: Path, data: list, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.data_path={json.dumps(data)}",
        f"data.eod_id={EOD}",
        "data.seq_length=32",
        "data.split=95,5,0",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "optimizer.lr=0.01",
        "optimizer.min_lr=0.001",
        "optimizer.lr_warmup_iters=2",
        "logging.log_interval=5",
        *TINY_MODEL,
        *extra,
    ]


def two_channels(root: Path) -> list:
    zh = write_corpus(root / "data", "zh", 80, 128, seed=1, period=3)
    en = write_corpus(root / "data", "en", 80, 128, seed=2, period=6)
    return [1, zh, 1, en]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["loss"] for r in map(json.loads, lines)}


def _train(args: list[str]) -> int:
    return run.main(args)


@pytest.mark.slow
def test_dp2_tp2_pp2_learns_and_checkpoints(tmp_path):
    args = tiny_args(
        tmp_path / "run",
        two_channels(tmp_path),
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=30",
        "logging.eval_interval=15",
        "logging.eval_iters=1",
    )
    assert run_on_ranks(_train, 8, args, timeout=600) == [0] * 8
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[i] for i in range(1, 6)) / 5, sum(curve[i] for i in range(26, 31)) / 5
    assert last < first - 0.5, (first, last)  # from ln(128) = 4.85 at init; noise is ~0.05
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (checkpoints / "iter_0000030" / "metadata.json").is_file()
    assert not list(checkpoints.glob("*.tmp"))


@pytest.mark.parametrize(
    "layout",
    [
        # fp32 across pipeline stages, dropout on: RNG streams matter as much as weights and moments.
        (
            "parallel.pipeline_model_parallel_size=2",
            "model.hidden_dropout=0.1",
            "model.attention_dropout=0.1",
        ),
        # bf16 params with fp32 main params/grads (the GPU precision path) across tensor parallel ranks.
        ("parallel.tensor_model_parallel_size=2", "train.bf16=true"),
    ],
    ids=["fp32-pp2-dropout", "bf16-tp2"],
)
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path, layout):
    data = two_channels(tmp_path)
    common = (*layout, "train.train_iters=10", "checkpoint.save_interval=100")
    full = tiny_args(tmp_path / "full", data, *common)
    assert run_on_ranks(_train, 4, full, timeout=600) == [0] * 4
    broken = tiny_args(tmp_path / "broken", data, *common, "train.exit_interval=4")
    assert run_on_ranks(_train, 4, broken, timeout=600) == [0] * 4
    assert max(losses(tmp_path / "broken")) == 4
    resumed = tiny_args(tmp_path / "broken", data, *common)
    assert run_on_ranks(_train, 4, resumed, timeout=600) == [0] * 4
    expected, got = losses(tmp_path / "full"), losses(tmp_path / "broken")
    assert [got[i] for i in range(5, 11)] == [expected[i] for i in range(5, 11)]


def test_resume_at_another_dp_size_works_and_other_tp_or_batch_size_is_refused(tmp_path, capfd):
    data = [1, write_corpus(tmp_path / "data", "zh", 40, 128, seed=1)]
    common = ("train.train_iters=4", "checkpoint.save_interval=100")
    first = tiny_args(tmp_path / "run", data, *common, "train.exit_interval=2")
    assert run_on_ranks(_train, 2, first, timeout=300) == [0, 0]  # DP = 2
    with pytest.raises(ConfigError) as err:
        run.main(tiny_args(tmp_path / "run", data, *common, "train.global_batch_size=16"))
    assert "consumed 16 samples in 2 iterations but this config's batch sizes put that iteration at " in (
        str(err.value)
    )
    at_tp2 = load_config(None, tiny_args(tmp_path / "run", data, *common, "tensor_model_parallel_size=2"))
    with pytest.raises(ConfigError, match="was saved at TP=1 PP=1; a resume needs the same TP/PP"):
        plan_run(at_tp2, world_size=2)
    capfd.readouterr()
    assert run_on_ranks(_train, 1, tiny_args(tmp_path / "run", data, *common), timeout=300) == [0]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert capfd.readouterr().out.count("checkpoint saved at DP=2, resuming at DP=1") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["train.micro_batch_sise=2"],
            "unknown config key 'train.micro_batch_sise'; did you mean 'micro_batch_size'?",
        ),
        (
            ["data.data_path=[1, /nonexistent/zh_text_document]"],
            "/nonexistent/zh_text_document.idx does not exist",
        ),
        (["train.global_batch_size=7"], "global_batch_size (7) is not divisible by micro_batch_size x DP"),
        (["patches.nonexistent={}"], "unknown patch 'nonexistent'"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, extra, message):
    args = tiny_args(tmp_path / "run", two_channels(tmp_path), *extra)
    with pytest.raises(ConfigError) as err:
        run.main(args)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_corrupt_idx_and_foreign_checkpoint_are_named(tmp_path):
    data = two_channels(tmp_path)
    Path(data[3] + ".idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 5)
    with pytest.raises(ConfigError, match="en_text_document.idx is not a Megatron index file"):
        run.main(tiny_args(tmp_path / "run", data))


def test_wall_clock_saves_keep_the_newest_and_another_architecture_is_refused(tmp_path):
    data = [1, write_corpus(tmp_path / "data", "zh", 40, 128, seed=1)]
    # A save every 0.06 ms of wall time is a save after every iteration; keep the newest 2.
    args = tiny_args(
        tmp_path / "run",
        data,
        "train.train_iters=3",
        "checkpoint.save_interval_minutes=1e-6",
        "checkpoint.keep_last=2",
    )
    assert run_on_ranks(_train, 1, args, timeout=300) == [0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    with pytest.raises(ConfigError) as err:
        run.main(tiny_args(tmp_path / "run", data, "train.train_iters=6", "model.num_layers=2"))
    assert "is another architecture (num_layers: checkpoint 4 vs config 2)" in str(err.value)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_patches.training", f"run_dir={tmp_path}", "train.bogus=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megatron_patches.training: error: unknown config key 'train.bogus'"
    ]


def _train_counting_gc(args: list[str]) -> tuple[int, list[bool], bool]:
    """Train; return the exit code, whether automatic GC was on at each ``gc.collect``, and after."""
    import gc

    collect, seen = gc.collect, []

    def counting_collect(*a, **k):
        seen.append(gc.isenabled())
        return collect(*a, **k)

    gc.collect = counting_collect
    try:
        return run.main(args), seen, gc.isenabled()
    finally:
        gc.collect = collect


def test_manual_gc_collects_at_its_interval_only_and_leaves_the_losses_alone(tmp_path):
    data = two_channels(tmp_path)
    common = ["train.train_iters=6", "logging.eval_interval=null", "checkpoint.save_interval=null"]
    [(code, collects, enabled_after)] = run_on_ranks(
        _train_counting_gc,
        1,
        tiny_args(tmp_path / "manual", data, *common, "train.manual_gc=true", "train.manual_gc_interval=3"),
        timeout=300,
    )
    # once when training starts, after iterations 3 and 6, before the final checkpoint; never with
    # automatic collection on, which comes back when the run ends
    assert (code, collects, enabled_after) == (0, [False] * 4, True)
    assert run_on_ranks(_train, 1, tiny_args(tmp_path / "auto", data, *common), timeout=300) == [0]
    assert losses(tmp_path / "manual") == losses(tmp_path / "auto")
    with pytest.raises(ConfigError, match="manual_gc_interval must be >= 0, got -1"):
        plan_run(load_config(None, tiny_args(tmp_path / "x", data, "train.manual_gc_interval=-1")), 1)
