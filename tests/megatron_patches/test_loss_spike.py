"""Loss-spike guard: the rule as a pure function, the actions in real runs with an injected spike."""

import json
import math
import random
import statistics

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.hooks import StepReport, enable_patch
from megatron_patches.loss_spike import (
    Options,
    SpikeDetector,
    Verdict,
    enable,
    mean_std,
    refuses_update,
    spike_record,
)
from megatron_patches.training.config import load_config
from megatron_patches.training.data import Phase
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars, train_with_probe
from tests.megatron_patches.training.test_train import losses, tiny_args, two_channels


def test_a_jump_over_mean_plus_k_std_is_a_spike_after_warmup():
    detector = SpikeDetector(window=5, warmup=3, std_factor=3.0, min_ratio=1.1)
    assert not detector.observe(100.0).spike  # still warming up: anything goes
    for loss in (3.0, 3.1, 2.9, 3.0):
        detector.observe(loss)
    assert list(detector.history) == [100.0, 3.0, 3.1, 2.9, 3.0]
    detector.history.clear()
    for loss in (3.0, 3.1, 2.9, 3.0):
        assert not detector.observe(loss).spike
    spike = detector.observe(4.0)
    assert spike.spike and spike.reason == "loss spike"
    assert spike.score == pytest.approx((4.0 - 3.0) / 0.0816496580927726)
    assert list(detector.history) == [3.0, 3.1, 2.9, 3.0]  # a spike stays out of the window
    assert not detector.observe(3.05).spike


def test_window_statistics_are_those_of_the_statistics_module():
    rng = random.Random(0)
    values = [2.0 + rng.gauss(0, 1e-3) for _ in range(100)]  # a late-training window: std << mean
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert std == pytest.approx(statistics.stdev(values), rel=1e-12)


def test_min_ratio_keeps_a_tiny_std_from_flagging_noise():
    detector = SpikeDetector(window=10, warmup=3, std_factor=3.0, min_ratio=1.1)
    for loss in (2.0, 2.0001, 2.0, 2.0001):
        detector.observe(loss)
    verdict = detector.judge(2.01)  # 200 std above the mean, but 0.5% above it
    assert verdict.score > 100 and not verdict.spike
    assert detector.judge(2.3).spike


def test_non_finite_loss_or_grad_norm_is_always_a_spike():
    detector = SpikeDetector(window=10, warmup=5, std_factor=3.0, min_ratio=1.1)
    assert detector.observe(math.nan) == Verdict(True, None, None, None, "non-finite loss")
    assert detector.observe(2.0, math.inf).reason == "non-finite grad norm"
    assert not detector.history


@pytest.mark.parametrize(
    ("action", "spike", "refused"),
    [("continue", True, False), ("skip", True, True), ("stop", True, True), ("skip", False, False)],
)
def test_which_actions_refuse_the_update(action, spike, refused):
    assert refuses_update(Verdict(spike, 5.0, 1.0, 0.1), action) is refused


def test_spike_record_lists_every_sample_of_the_batch_with_its_channel():
    report = StepReport(7, math.nan, 512, math.inf, 1e-3, True)
    phase = Phase("main", 0, 10, (1, "zh", 1, "en"), 32, 8, 2, channels=("zh", "en"))
    gathered = [([12, 13], [0, 1]), ([10, 11], [1, 1])]  # two DP ranks' ids
    record = spike_record(report, Verdict(True, None, None, None, "non-finite loss"), "skip", phase, gathered)
    assert json.loads(json.dumps(record)) == {
        "iteration": 7,
        "loss": "nan",
        "grad_norm": "inf",
        "score": None,
        "mean": None,
        "std": None,
        "reason": "non-finite loss",
        "action": "skip",
        "phase": "main",
        "seq_length": 32,
        "samples": [
            {"sample_id": 10, "dataset_id": 1, "channel": "en"},
            {"sample_id": 11, "dataset_id": 1, "channel": "en"},
            {"sample_id": 12, "dataset_id": 0, "channel": "zh"},
            {"sample_id": 13, "dataset_id": 1, "channel": "en"},
        ],
    }


def test_the_window_travels_in_checkpoints():
    cfg = load_config(None, ["run_dir=/tmp/r"])
    guard = enable(Options(window=4, warmup=2), cfg)
    for loss in (3.0, 2.0, 1.0, 5.0, 4.0):
        guard.detector.observe(loss)
    resumed = enable(Options(window=4, warmup=2), cfg)
    resumed.load_state_dict(guard.state_dict())
    assert list(resumed.detector.history) == [2.0, 1.0, 5.0, 4.0]
    assert resumed.detector.judge(9.0) == guard.detector.judge(9.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"action": "rewind"}, "action must be one of ('continue', 'skip', 'stop', 'rollback')"),
        ({"drop_ratio": 1.5}, "drop_ratio must be below 1, got 1.5"),
        ({"max_rollbacks": -1}, "max_rollbacks must be an integer above -1, got -1"),
        ({"window": 10, "warmup": 20}, "warmup (20) exceeds window (10)"),
        ({"std_factor": "x"}, "config key 'patches.loss_spike.std_factor' expects float, got 'x'"),
        ({"std_factor": -1}, "std_factor must be a number above 0, got -1"),
        ({"window": 1.5}, "config key 'patches.loss_spike.window' expects int, got 1.5"),
        ({"window": 1}, "window must be an integer above 1"),
        ({"windw": 5}, "unknown config key 'patches.loss_spike.windw'; did you mean 'window'?"),
        ({"file": "/abs.jsonl"}, "file must be a file name inside run_dir"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ConfigError) as err:
        enable_patch("loss_spike", options, load_config(None, ["run_dir=/tmp/r"]))
    assert message in str(err.value)


def _spike_args(run_dir, data, action, *extra):
    guard = f"{{action: {action}, warmup: 3, window: 10, std_factor: 3, min_ratio: 1.5}}"
    return tiny_args(
        run_dir,
        data,
        "train.train_iters=8",
        "logging.log_interval=1",
        f"patches.loss_spike={guard}",
        "patches.probe={}",
        *extra,
    )


def _spikes(run_dir):
    return [json.loads(line) for line in (run_dir / "loss_spikes.jsonl").read_text().splitlines()]


def test_continue_logs_the_spike_and_a_nan_loss_never_updates_the_weights(tmp_path):
    # DP=2 x PP=2: the batch's sample ids live on the two last-stage ranks.
    run_dir = tmp_path / "run"
    args = _spike_args(run_dir, two_channels(tmp_path), "continue", "parallel.pipeline_model_parallel_size=2")
    results = run_on_ranks(train_with_probe, 4, args, {5: 10.0, 7: math.nan}, timeout=300)
    assert [code for code, _ in results] == [0] * 4
    spikes = _spikes(run_dir)
    assert [(s["iteration"], s["reason"], s["action"]) for s in spikes] == [
        (5, "loss spike", "continue"),
        (7, "non-finite loss", "continue"),
    ]
    assert [s["sample_id"] for s in spikes[0]["samples"]] == list(range(32, 40))  # the global batch
    assert {(s["dataset_id"], s["channel"]) for s in spikes[0]["samples"]} == {(0, "zh"), (1, "en")}
    assert spikes[0]["score"] > 3 and spikes[0]["loss"] > 1.5 * spikes[0]["mean"]
    assert tensorboard_scalars(run_dir, "spike/score") == {5: pytest.approx(spikes[0]["score"], rel=1e-6)}
    for _, record in results:  # every rank: the spike updated, the NaN did not
        weights = record["fingerprint"]
        assert weights[5] != weights[4]
        assert weights[7] == weights[6]
        assert weights[8] != weights[7]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False] * 6 + [True, False]
    assert math.isnan(losses(run_dir)[7])


def test_stop_exits_cleanly_and_leaves_the_checkpoint_from_before_the_spike_as_the_resume_point(tmp_path):
    run_dir = tmp_path / "run"
    args = _spike_args(run_dir, two_channels(tmp_path), "stop", "checkpoint.save_interval=3")
    results = run_on_ranks(train_with_probe, 2, args, {5: 10.0}, timeout=300)
    assert [code for code, _ in results] == [0, 0]
    assert [(s["iteration"], s["action"]) for s in _spikes(run_dir)] == [(5, "stop")]
    for _, record in results:
        assert record["fingerprint"][5] == record["fingerprint"][4]  # no update from the spike
        assert record["saves"] == [3]  # nothing saved at the spike: iterations 4 and 5 led to it
    assert max(losses(run_dir)) == 5
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
