"""Roll-back past bad data: skipped windows, resume from an older checkpoint, in-process roll-back."""

import json
from pathlib import Path

import pytest

from megatron_patches.errors import ConfigError
from megatron_patches.training import rollback, skip_windows
from megatron_patches.training.config import DataConfig
from megatron_patches.training.data import Phase, PhaseData
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.poison import poisoned_copy, write_skewed_corpus
from tests.megatron_patches.training.test_train import _train, losses, tiny_args


def test_samples_after_a_window_are_the_unaffected_ones_shifted_by_the_skipped_count():
    spans = skip_windows.of_phase(skip_windows.parse([[10, 13], [20, 21]]), "main")
    ids = [skip_windows.dataset_index(p, spans) for p in range(24)]
    assert ids == list(range(10)) + list(range(14, 20)) + list(range(22, 30))
    assert skip_windows.skipped_count(spans) == 6


def test_windows_merge_and_keep_their_phase():
    windows = skip_windows.parse([[5, 9], [0, 2], [3, 4], [8, 12], [1, 1, "anneal"]])
    assert windows == [(1, 1, "anneal"), (0, 12, "main")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([[5, 2]], "needs integer sample ids 0 <= start <= end"),
        ([[-1, 2]], "needs integer sample ids 0 <= start <= end"),
        ([[1.5, 2]], "needs integer sample ids"),
        ([[1, 2, 3, 4]], "is not [start, end] or [start, end, phase]"),
        ([3], "is not [start, end] or [start, end, phase]"),
        ("1-3", "must be a list of [start, end] sample-id pairs"),
    ],
)
def test_bad_skip_samples_are_named_in_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        skip_windows.parse(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


class _Samples:
    def __getitem__(self, i):
        return {"tokens": [i], "labels": [i], "loss_mask": [1.0], "position_ids": [0]}


def _phase_data(skipped=()):
    phases = [Phase("main", 0, 10, (), 1, 4, 2)]
    data = PhaseData(phases, DataConfig(), None, 0, "", 0, dp_rank=0, dp_size=1, skipped=list(skipped))
    data.phase, data.train = phases[0], _Samples()
    return data


def _ids(data, iteration):
    return [int(i) for b in data.train_batches(iteration) for i in b["sample_id"]]


def test_a_roll_back_skips_what_was_read_since_the_checkpoint_plus_the_margin():
    data = _phase_data([(2, 3, "main")])  # a window from before: ids 2 and 3 are never read
    assert [_ids(data, it) for it in (0, 1, 2)] == [[0, 1, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]
    read = data.read_windows(1, 3, margin=2)  # rolled back to the checkpoint of iteration 1
    assert read == [(6, 15, "main")]
    data.skip(read)
    assert _ids(data, 0) == [0, 1, 4, 5]  # what the checkpoint had read is unchanged
    assert _ids(data, 1) == [16, 17, 18, 19]  # the next iteration reads past the window


def _fake_checkpoints(root: Path, iterations: list[int]) -> None:
    for it in iterations:
        (root / f"iter_{it:07d}").mkdir(parents=True)
        (root / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    (root / "latest_checkpointed_iteration.txt").write_text(str(iterations[-1]))


def test_a_roll_back_reloads_the_newest_checkpoint_at_least_lookback_before_the_anomaly(tmp_path):
    _fake_checkpoints(tmp_path, [8, 16, 20, 24])  # iter_24: a newer, abandoned branch's
    assert rollback.target(tmp_path, 23, lookback=0).name == "iter_0000020"  # the newest before it
    assert rollback.target(tmp_path, 21, lookback=1).name == "iter_0000020"
    assert rollback.target(tmp_path, 23, lookback=4).name == "iter_0000016"
    assert rollback.target(tmp_path, 8, lookback=0) is None


def test_load_iteration_names_a_pruned_checkpoint_and_refuses_to_mix_branches(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_checkpoints(old, [30, 40])
    branched_from = {old / "iter_0000040": None, new / "iter_0000035": 30}
    monkeypatch.setattr(rollback.checkpoint, "saved_lineage", lambda path: ([], branched_from[path]))
    with pytest.raises(ConfigError, match=r"has no checkpoint of that iteration \(it has \[30, 40\]; "):
        rollback.resume_point(old, old, 20, keep_last=2)
    with pytest.raises(
        ConfigError, match=r"holds later checkpoints \[40\] .* checkpoint.save=<a new directory>"
    ):
        rollback.resume_point(old, old, 30, keep_last=2)
    assert rollback.resume_point(old, new, 30, keep_last=2) == old / "iter_0000030"
    _fake_checkpoints(new, [35])  # the new branch saved: a relaunch with the same config continues it
    assert rollback.resume_point(old, new, 30, keep_last=2) == new / "iter_0000035"


def test_a_resume_keeps_its_checkpoints_windows_and_refuses_new_ones_behind_it(tmp_path, monkeypatch):
    phases = [Phase("main", 0, 10, (), 32, 8, 2), Phase("anneal", 10, 12, (), 32, 8, 2)]
    saved = [[16, 23, "main"]]  # a roll-back's window, recorded in the checkpoint of iteration 4
    monkeypatch.setattr(rollback.checkpoint, "saved_lineage", lambda path: (saved, None))
    monkeypatch.setattr(rollback.checkpoint, "saved_progress", lambda path: _Progress(4))
    ckpt = tmp_path / "iter_0000004"
    assert rollback.planned_windows([], ckpt, phases) == [(16, 23, "main")]
    ahead = rollback.planned_windows([[40, 47], [0, 3, "anneal"]], ckpt, phases)
    assert ahead == [(0, 3, "anneal"), (16, 23, "main"), (40, 47, "main")]
    with pytest.raises(ConfigError, match=r"\[30, 50, 'main'\] starts before sample 40 of phase 'main'"):
        rollback.planned_windows([[30, 50]], ckpt, phases)  # iteration 4 reads from sample 32 + 8 on


class _Progress:
    def __init__(self, iteration):
        self.iteration = iteration


def _guard(tmp_path, **options):
    from megatron_patches.loss_spike import Options, enable
    from megatron_patches.training.config import load_config

    return enable(Options(action="rollback", **options), load_config(None, [f"run_dir={tmp_path}"]))


def test_rollback_action_cools_down_then_stops_without_saving_after_the_limit(tmp_path):
    from megatron_patches.hooks import Requests

    guard = _guard(tmp_path, max_rollbacks=2, cooldown=5, skip_margin=3)
    first = Requests()
    assert guard.decide("loss spike at iteration 10", 10, first) == "rollback"
    assert first.rollback.skip_margin == 3 and not first.stop
    during = Requests()
    assert guard.decide("loss spike at iteration 12", 12, during) == "skip (roll-back cool-down)"
    assert during.rollback is None and not during.stop
    guard.load_state_dict({"history": [], "rollbacks": 0, "quiet_until": 0})  # the reload keeps the count
    assert guard.decide("loss drop at iteration 15", 15, Requests()) == "rollback"
    last = Requests()
    assert guard.decide("loss spike at iteration 30", 30, last) == "stop"
    assert last.stop_without_save and "after 2 roll-backs" in last.stop and last.rollback is None


def test_drops_have_their_own_threshold_and_are_off_by_default():
    from megatron_patches.loss_spike import SpikeDetector

    rises_only = SpikeDetector(window=10, warmup=3, std_factor=3.0, min_ratio=1.1)
    both = SpikeDetector(
        window=10, warmup=3, std_factor=3.0, min_ratio=1.1, drop_std_factor=3.0, drop_ratio=0.8
    )
    for loss in (3.0, 3.1, 2.9, 3.0):
        rises_only.observe(loss)
        both.observe(loss)
    assert not rises_only.judge(1.0).spike
    assert both.judge(1.0).reason == "loss drop" and both.judge(1.0).score < -3
    assert not both.judge(2.7).spike  # 3.7 std under the mean, but not under 0.8 x mean
    assert both.judge(4.0).reason == "loss spike"


# -- end to end: a poisoned window at DP2 x PP2 ------------------------------------------------------

WINDOW = (176, 191)  # sample ids of iterations 23 and 24 (global batch 8)
GUARD = "{{action: rollback, warmup: 5, window: 8, std_factor: 3, min_ratio: 1.2, {extra} skip_margin: 8}}"


def _poisoned_blend(tmp_path: Path, kind: str) -> list:
    """Two channels, the second poisoned in ``WINDOW`` (``rise`` or ``drop``)."""
    # One epoch of each channel: Megatron's sample order then does not depend on the dataset size.
    clean = [
        1,
        write_skewed_corpus(tmp_path, "zh", 300, seed=1),
        1,
        write_skewed_corpus(tmp_path, "en", 300, seed=2),
    ]
    # Megatron-Core's dataset builder wants a process group: one rank builds the poisoned copy.
    [data] = run_on_ranks(poisoned_copy, 1, clean, 1, WINDOW, kind, tmp_path / "poisoned", 128)
    return data


def _poisoned_args(run_dir, data, kind, *extra):
    drop = "drop_std_factor: 3, drop_ratio: 0.8," if kind == "drop" else ""
    return tiny_args(
        run_dir,
        data,
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=32",
        "logging.log_interval=1",
        "logging.eval_interval=32",
        "checkpoint.save_interval=4",
        f"patches.loss_spike={GUARD.format(extra=drop)}",
        *extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rise", "drop"])
def test_a_poisoned_window_is_rolled_back_and_skipped_like_removing_it_up_front(tmp_path, kind):
    data = _poisoned_blend(tmp_path, kind)
    run_dir = tmp_path / "rollback"
    assert run_on_ranks(_train, 4, _poisoned_args(run_dir, data, kind), timeout=600) == [0] * 4
    [record] = [json.loads(line) for line in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    assert record["iteration"] == 23 and record["checkpoint_iteration"] == 20
    assert record["skipped"] == [[160, 191, "main"]]  # read since iteration 20, plus the margin
    spike = json.loads((run_dir / "loss_spikes.jsonl").read_text().splitlines()[0])
    assert (
        spike["reason"] == ("loss spike" if kind == "rise" else "loss drop") and spike["action"] == "rollback"
    )
    assert tensorboard_scalars(run_dir, "rollback/to_iteration") == {23: 20.0}

    reference = tmp_path / "reference"
    skip = "data.skip_samples=[[160,191]]"
    assert run_on_ranks(_train, 4, _poisoned_args(reference, data, kind, skip), timeout=600) == [0] * 4
    assert not (reference / "rollbacks.jsonl").exists()
    final = tensorboard_scalars(run_dir, "lm loss validation")[32]
    assert final == pytest.approx(tensorboard_scalars(reference, "lm loss validation")[32], rel=1e-3)
    assert losses(run_dir) == losses(reference)  # after the roll-back: the same steps, bit for bit


@pytest.mark.slow
def test_keep_last_1_spares_the_checkpoint_a_look_back_roll_back_reloads(tmp_path):
    data = _poisoned_blend(tmp_path, "rise")
    run_dir = tmp_path / "rollback"
    guard = GUARD.format(extra="lookback: 4,")
    args = tiny_args(
        run_dir,
        data,
        "train.train_iters=24",
        "checkpoint.save_interval=4",
        "checkpoint.keep_last=1",
        "logging.log_interval=1",
        f"patches.loss_spike={guard}",
    )
    assert run_on_ranks(_train, 2, args, timeout=600) == [0, 0]
    [record] = [json.loads(line) for line in (run_dir / "rollbacks.jsonl").read_text().splitlines()]
    # The anomaly at 23 reaches back 4 iterations: not iter_20 (the newest) but iter_16, which
    # keep_last=1 would have deleted when iter_20 was saved.
    assert record["iteration"] == 23 and record["checkpoint_iteration"] == 16
    assert record["skipped"] == [[128, 191, "main"]]  # read since iteration 16, plus the margin
    # keep_last=1 still prunes: at the end only iter_24 and the one a roll-back after 24 would need
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert kept == ["iter_0000020", "iter_0000024"]
    # The log tags the abandoned iterations; TensorBoard shows one value per step, the new branch's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "rolled_back_at" not in r] == list(range(1, 25))
    assert [r["iteration"] for r in records if r.get("rolled_back_at") == 23] == list(range(17, 24))
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("lm loss")] == list(range(1, 25))
    assert {e.step: e.value for e in events.Scalars("lm loss")} == pytest.approx(losses(run_dir))
