"""Loss -> benchmark accuracy: the sigmoid fit and the accuracy it predicts at the big run's loss."""

import json

import numpy as np
import pytest

from megatron_patches.errors import ConfigError
from tools.scaling.benchmark import Sigmoid, fit_sigmoid, read_accuracy

TRUE = Sigmoid(floor=0.25, ceiling=0.9, slope=6.0, midpoint=2.4)


def test_the_sigmoid_is_recovered_and_predicts_accuracy_at_a_lower_loss():
    loss = np.linspace(3.2, 2.2, 9)  # the grid's runs: mostly near chance, rising at the end
    accuracy = TRUE.accuracy(loss) + np.random.default_rng(0).normal(0.0, 0.005, loss.shape)
    fit = fit_sigmoid(loss, accuracy)
    assert fit.midpoint == pytest.approx(TRUE.midpoint, abs=0.05)
    assert fit.floor == pytest.approx(TRUE.floor, abs=0.02)
    assert fit.accuracy(2.3) == pytest.approx(TRUE.accuracy(2.3), abs=0.03)


def test_a_given_chance_level_is_kept_as_the_floor():
    loss = np.linspace(3.0, 2.0, 6)
    fit = fit_sigmoid(loss, TRUE.accuracy(loss), chance=0.25)
    assert fit.floor == 0.25
    assert fit.accuracy(10.0) == pytest.approx(0.25, abs=1e-6)


def test_bad_accuracies_and_records_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"lie in \[0, 1\]"):
        fit_sigmoid([3.0, 2.8, 2.6, 2.4], [0.2, 0.3, 1.4, 0.5])
    records = tmp_path / "bench.jsonl"
    records.write_text("\n".join(json.dumps({"id": str(i), "correct": i % 4 == 0}) for i in range(8)) + "\n")
    assert read_accuracy(records) == 0.25
    (tmp_path / "bad.jsonl").write_text('{"id": "1"}\n')
    with pytest.raises(ConfigError, match="not a tools.eval bench records file"):
        read_accuracy(tmp_path / "bad.jsonl")
