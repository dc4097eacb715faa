"""Channel loss: per-channel sums as pure functions; at TP=2 x PP=2 x DP=2 against a 1-process reference."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_patches import channel_loss
from megatron_patches.channel_loss import ChannelLoss, channel_sums, named_totals, reduce_channels
from megatron_patches.errors import ConfigError
from megatron_patches.hooks import StepReport, enable_patch
from megatron_patches.training.config import load_config
from tests.dist import run_on_ranks
from tests.megatron_patches.probe import tensorboard_scalars
from tests.megatron_patches.training.corpus import write_corpus
from tests.megatron_patches.training.test_train import _train, tiny_args


def test_sums_per_channel_count_only_loss_tokens():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    sums = channel_sums(losses, mask, torch.tensor([2, 0, 2]), num_channels=3)
    assert sums.tolist() == [[15.0, 3.0], [0.0, 0.0], [3.0, 2.0]]
    assert named_totals(sums, ("zh", "en", "code")) == {"zh": (15.0, 3.0), "code": (3.0, 2.0)}


def test_ranks_that_saw_different_channels_or_none_agree():
    parts = [{"zh": (6.0, 3.0)}, {}, {"zh": (2.0, 1.0), "code": (9.0, 3.0)}, {"en": (0.0, 0.0)}]
    assert reduce_channels(parts) == {"zh": (2.0, 4), "code": (3.0, 3)}  # no NaN for an empty channel
    assert reduce_channels([{}, {}]) == {}


def _iteration(hook: ChannelLoss, loss: float, *micro_batches) -> None:
    """One iteration of one-sample micro-batches ``(token losses, mask, channel)`` with global ``loss``."""
    for losses, mask, channel in micro_batches:
        batch = {"dataset_id": torch.tensor([channel])}
        hook.on_micro_batch_loss(None, torch.tensor([losses]), torch.tensor([mask]), batch, True)
    report = StepReport(iteration=1, loss=loss, tokens=1, grad_norm=1.0, lr=0.1, skipped=False)
    hook.after_step(None, report, None)


def test_the_window_sums_what_it_holds_at_a_bound_at_a_phase_change_and_at_the_log(monkeypatch):
    monkeypatch.setattr(channel_loss, "MAX_HELD_MICRO_BATCHES", 3)
    hook = ChannelLoss()
    window = hook.window
    window.start_phase(("zh", "en"), torch.device("cpu"))
    _iteration(hook, 2.0, ([1.0, 2.0], [1.0, 1.0], 0), ([4.0, 8.0], [1.0, 0.0], 1))
    assert len(window.kept) == 2 and window.sums.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # held, not summed
    _iteration(hook, float("nan"), ([100.0, 100.0], [1.0, 1.0], 0))  # a non-finite iteration counts nowhere
    assert len(window.kept) == 2 and not window.pending
    _iteration(hook, 2.0, ([5.0, 5.0], [0.0, 1.0], 1))  # the third held: summed now
    assert not window.kept and window.sums.tolist() == [[3.0, 2.0], [9.0, 2.0]]
    _iteration(hook, 2.0, ([7.0, 1.0], [1.0, 1.0], 1))
    window.start_phase(("en", "code"), torch.device("cpu"))  # what is held is summed under the old names
    _iteration(hook, 2.0, ([2.0, 2.0], [1.0, 1.0], 0))
    assert window.take() == {"zh": (3.0, 2.0), "en": (21.0, 6.0)}
    assert window.take() == {} and not window.kept


def test_channel_loss_takes_no_options():
    with pytest.raises(ConfigError, match=r"unknown config key 'patches.channel_loss.names'"):
        enable_patch("channel_loss", {"names": {}}, load_config(None, []))


def _args(run_dir: Path, data: list) -> list[str]:
    # lr 0: the weights stay those of the checkpoint, so one process can recompute
    # every window from the same samples. A large init spreads the channels' losses.
    return tiny_args(
        run_dir,
        data,
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "train.train_iters=6",
        "optimizer.lr=0",
        "optimizer.min_lr=0",
        "optimizer.lr_warmup_iters=0",
        "model.init_method_std=0.3",
        "model.make_vocab_size_divisible_by=64",  # same padded vocab at TP 1 and 2
        "logging.log_interval=1",
        "logging.eval_interval=6",
        "logging.eval_iters=2",
        "data.channels={chinese: " + data[1] + "}",
        "patches.channel_loss=true",
    )


def _per_channel(model, batches, names, into):
    for batch in batches:
        with torch.no_grad():
            token_losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"]
        sums = (token_losses * mask).sum(dim=1).double()
        rows = zip(sums, mask.sum(dim=1), batch["dataset_id"], strict=True)
        for loss, tokens, dataset_id in rows:
            old = into.get(names[dataset_id], (0.0, 0))
            into[names[dataset_id]] = (old[0] + float(loss), old[1] + int(tokens))
    return into


def _reference(args: list[str], checkpoint: str, iterations: int, eval_iters: int):
    """Per-channel (loss sum, tokens) of each iteration and of the evaluation, in one process."""
    from megatron.core import dist_checkpointing

    from megatron_patches import parallel
    from megatron_patches.training.data import DatasetTokenizer, PhaseData, phase_at
    from megatron_patches.training.model import build_model_for_this_rank
    from megatron_patches.training.validate import plan_run

    layout = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
    # A run directory of its own: in the training run's, plan_run would see a resume at another TP/PP.
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    cfg = load_config(None, [*args, *layout, f"run_dir={run_dir}-reference"])
    plan = plan_run(cfg, 1)
    parallel.initialize(plan.layout, cfg.seed, cfg.model)
    model = build_model_for_this_rank(cfg.model)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)["model"])
    model.eval()
    tokenizer = DatasetTokenizer(plan.data.eod_id, cfg.model.vocab_size)
    cache = str(Path(cfg.run_dir) / "data_cache")
    data = PhaseData(plan.phases, cfg.data, tokenizer, cfg.seed, cache, eval_iters, 0, 1)
    train = {}
    for iteration in range(iterations):
        phase = phase_at(plan.phases, iteration)
        if data.phase is not phase:
            data.enter(phase)
        train[iteration + 1] = _per_channel(model, data.train_batches(iteration), phase.channels, {})
    valid = {}
    for k in range(eval_iters):
        _per_channel(model, data.valid_batches(k), data.phase.channels, valid)
    return train, valid


@pytest.mark.slow
def test_channel_losses_at_tp2_pp2_dp2_equal_a_single_process_reference(tmp_path):
    zh = write_corpus(tmp_path / "data", "zh", 80, 128, seed=1, period=3)
    en = write_corpus(tmp_path / "data", "en", 80, 128, seed=2, period=6)
    run_dir = tmp_path / "run"
    args = _args(run_dir, [1, zh, 0.1, en])  # en is rare: some iterations have none
    assert run_on_ranks(_train, 8, args, timeout=600) == [0] * 8
    [(train, valid)] = run_on_ranks(
        _reference, 1, args, str(run_dir / "checkpoints" / "iter_0000006"), 6, 2, timeout=300
    )

    logged = {name: tensorboard_scalars(run_dir, f"channel_loss/{name}") for name in ("chinese", "en")}
    tokens = {name: tensorboard_scalars(run_dir, f"channel_tokens/{name}") for name in ("chinese", "en")}
    lm_loss = tensorboard_scalars(run_dir, "lm loss")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    window_tokens = {r["iteration"]: r["tokens"] for r in map(json.loads, lines)}
    assert set(logged["chinese"]) == set(range(1, 7))
    assert 0 < len(logged["en"]) < 6  # windows without en log nothing for it, not NaN
    for step, reference in train.items():
        assert set(reference) == {name for name in logged if step in logged[name]}
        for name, (loss_sum, count) in reference.items():
            assert logged[name][step] == pytest.approx(loss_sum / count, rel=2e-5)
            assert tokens[name][step] == count
        weighted = sum(logged[n][step] * tokens[n][step] for n in reference) / window_tokens[step]
        assert sum(tokens[n][step] for n in reference) == window_tokens[step]
        assert weighted == pytest.approx(lm_loss[step], rel=2e-5)  # same tokens, same loss
    assert all(math.isfinite(v) for series in logged.values() for v in series.values())
    both = [step for step in train if len(train[step]) == 2]
    spread = max(abs(logged["chinese"][s] - logged["en"][s]) / logged["en"][s] for s in both)
    assert spread > 1e-2  # the channels differ: a mix-up could not pass the checks above
    for name, (loss_sum, count) in valid.items():
        assert tensorboard_scalars(run_dir, f"channel_val_loss/{name}")[6] == pytest.approx(
            loss_sum / count, rel=2e-5
        )
