"""The trainer end to end on gloo ranks: learning, exact resume, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patches import paths
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
        "data.max_epochs=null",  # tiny corpora: tests read them many times over on purpose
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
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # no temporary left


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
    """With the optimizer state saved dp_reshardable; fully_reshardable: test_resume_layout.py."""
    data = [1, write_corpus(tmp_path / "data", "zh", 40, 128, seed=1)]
    common = (
        "train.train_iters=4",
        "checkpoint.save_interval=100",
        "checkpoint.dist_ckpt_optim_fully_reshardable=false",
    )
    first = tiny_args(tmp_path / "run", data, *common, "train.exit_interval=2")
    assert run_on_ranks(_train, 2, first, timeout=300) == [0, 0]  # DP = 2
    with pytest.raises(ConfigError) as err:
        run.main(tiny_args(tmp_path / "run", data, *common, "train.global_batch_size=16"))
    assert "would change train.global_batch_size: checkpoint 8, this run 16; restore the setting, or " in (
        str(err.value)
    )
    at_tp2 = load_config(None, tiny_args(tmp_path / "run", data, *common, "tensor_model_parallel_size=2"))
    with pytest.raises(ConfigError, match="saved at TP=1 PP=1 with dp_reshardable optimizer state, which lo"):
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


def _drop_run_settings(checkpoint_dir: Path) -> None:
    """Make ``checkpoint_dir`` look written before checkpoints recorded their run settings."""
    import torch

    common_file = checkpoint_dir / "common.pt"
    common = torch.load(common_file, weights_only=False)
    del common["run_settings"]
    torch.save(common, common_file)


def test_resume_refuses_a_changed_seed_seq_length_or_blend_unless_allowed_and_logs_it(tmp_path, capfd):
    from megatron_patches.training import checkpoint

    zh, en = (write_corpus(tmp_path / "data", name, 40, 128, seed=1) for name in ("zh", "en"))
    common = ("train.train_iters=4", "checkpoint.save_interval=100")
    first = tiny_args(tmp_path / "run", [1, zh], *common, "train.exit_interval=2")
    assert run_on_ranks(_train, 1, first, timeout=300) == [0]

    def plan(*extra: str, data: tuple = (1, zh)):
        return plan_run(load_config(None, tiny_args(tmp_path / "run", list(data), *common, *extra)), 1)

    zh_abs, en_abs = Path(zh).resolve(), Path(en).resolve()
    cases = [
        (
            ("seed=99",),
            "seed: checkpoint 1234, this run 99; restore the setting, or pass "
            "checkpoint.allow_change=[seed] to change it deliberately",
        ),
        (("data.seq_length=16",), "data.seq_length: checkpoint 32, this run 16"),
        ((), f"data.blend: checkpoint [1.0, '{zh_abs}'], this run [0.5, '{zh_abs}', 0.5, '{en_abs}']"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as err:
            plan(*extra, data=(1, zh) if extra else (1, zh, 1, en))
        assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="'sed' is not a recorded run setting; did you mean 'seed'"):
        plan("seed=99", "checkpoint.allow_change=[sed]")
    capfd.readouterr()
    allowed = tiny_args(tmp_path / "run", [1, zh], *common, "seed=99", "checkpoint.allow_change=[seed]")
    assert run_on_ranks(_train, 1, allowed, timeout=300) == [0]
    assert "resume: seed changes from 1234 to 99 (checkpoint.allow_change)" in capfd.readouterr().out
    last = tmp_path / "run" / "checkpoints" / "iter_0000004"
    assert checkpoint.saved_settings(last)["seed"] == 99  # the next resume compares with the new seed
    _drop_run_settings(last)  # a checkpoint from before this record still resumes, and says so
    assert "predates recorded run settings" in plan("seed=7").notes[0]


def test_a_resume_logs_each_iteration_once_and_every_log_has_the_lr_the_step_used(tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_patches.training.schedules import lr_at
    from tools.eval.trends import tensorboard_scalars

    run_dir, data = tmp_path / "run", [1, write_corpus(tmp_path / "data", "zh", 40, 128, seed=1)]
    args = tiny_args(
        run_dir,
        data,
        "train.train_iters=6",
        "logging.log_interval=1",
        "checkpoint.save_interval=4",
        "checkpoint.save_at_end=false",
        "patches.save_trigger=true",
    )
    # A run that logged iterations 1..6 but whose last checkpoint is 4, killed while writing a record.
    assert run_on_ranks(_train, 1, args, timeout=300) == [0]
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"iteration": 7, "lo')
    (run_dir / "stop").touch()
    checkpoints = run_dir / "checkpoints"
    superseded = checkpoints / f".iter_0000004.old-{paths.owner_tag(2**40)}-0123abcd"  # a killed re-save's
    superseded.mkdir()
    (checkpoints / "iter_0000002.tmp").mkdir()  # a save interrupted before saves were atomic
    capfd.readouterr()
    assert run_on_ranks(_train, 1, args, timeout=300) == [0]  # resumes at 4; the stop file ends it after 5
    out, err = capfd.readouterr()
    assert f"checkpoint leftovers in {checkpoints}: removed {superseded.name} (a superseded copy" in err
    assert "; kept iter_0000002.tmp (a save interrupted before saves were atomic" in err
    assert not superseded.exists() and (checkpoints / "iter_0000002.tmp").is_dir()
    assert f"iter_0000005 ({(run_dir / 'stop').resolve()} exists)" in out  # not "(interval)"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    tensorboard = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    tensorboard.Reload()
    assert [e.step for e in tensorboard.Scalars("lm loss")] == [1, 2, 3, 4, 5]
    # One LR per iteration everywhere: the one its step used (0 at the first step of a warm-up from 0).
    used = [lr_at(r["iteration"] - 1, load_config(None, args).optimizer, 6) for r in records]
    assert [r["lr"] for r in records] == pytest.approx(used, rel=1e-12)
    assert list(tensorboard_scalars(run_dir / "tensorboard")["lr"].values()) == pytest.approx(used, rel=1e-6)
    assert "iteration       5/6 | consumed tokens 1,280 | lm loss " in out
    assert f"| lr {used[4]:.3e} |" in out
