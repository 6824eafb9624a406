"""The digits example's split, participant and command line (no services)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn_digits import data, participant  # noqa: E402


def test_split_is_deterministic_and_disjoint() -> None:
    a, b = data.split(4, seed=1), data.split(4, seed=1)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    sizes = [len(s.y) + len(s.y_val) for s in a.shards]
    assert sum(sizes) + len(a.y_test) == 1797 and max(sizes) - min(sizes) <= 1
    rows = np.concatenate([a.x_test, *[np.concatenate([s.x, s.x_val]) for s in a.shards]])
    assert len(np.unique(rows, axis=0)) == len(np.unique(data.load()[0], axis=0))
    assert a.shards[0].x.max() <= 1.0  # pixels scaled by their known range
    with pytest.raises(ValueError):
        data.split(1000)


def test_a_round_of_training() -> None:
    import rondo.sklearn

    p = participant.make_participant(0, 3, seed=0, epochs=2)
    weights = p.initial_weights()
    assert {k: v.shape for k, v in weights.items()} == {"coef": (10, 64), "intercept": (10,)}
    new, n_samples, metrics = p.train_round(weights, 1)
    assert n_samples == len(data.split(3, 0).shards[0].y)
    assert metrics["global_accuracy"] < 0.2 < 0.8 < metrics["accuracy"]
    assert set(metrics) >= {"loss", "val_loss", "accuracy", "n_samples"}
    assert new["coef"].shape == (10, 64) and not np.shares_memory(new["coef"], weights["coef"])
    # The next round starts from what it is given, not from its own last model.
    new2, _, metrics2 = p.train_round(rondo.sklearn.zero_weights(64, 10), 2)
    assert metrics2["global_accuracy"] < 0.2


@pytest.mark.parametrize(
    "args",
    [
        ["--participant", "3", "--number-of-participants", "3"],
        ["--participant", "0", "--number-of-participants", "0"],
        ["--participant", "0"],
        ["--participant", "0", "--number-of-participants", "2", "--epochs", "x"],
    ],
)
def test_bad_arguments(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sklearn_digits.participant", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
