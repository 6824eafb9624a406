"""The digits data (scikit-learn's bundled ``load_digits``: 1797 8x8 images, 10 classes,
offline) split into a held-out test set and one shard per participant.

The split is a pure function of ``(number of participants, seed)``, so every process computes
the same one and each participant keeps only its own shard. (In this simulation every process
can read the whole bundled data set; a real participant would have only its own rows.)

Preprocessing needs no fitted statistics: pixels are intensities from 0 to 16, divided by 16,
a scale known from the data set's definition. Nothing has to be agreed on from the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
CLASSES = np.arange(10)
N_FEATURES = 64
PIXEL_MAX = 16.0


@dataclass
class Shard:
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class Split:
    x_test: np.ndarray
    y_test: np.ndarray
    shards: list[Shard]


def load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / PIXEL_MAX).astype(np.float64), y.astype(np.int64)


def split(n_participants: int, seed: int = 0) -> Split:
    """Hold out a random test set; deal the rest at random (IID) into ``n_participants``
    shards, each with a validation slice.

    Raises:
        ValueError: fewer than 2 rows per shard would be left.
    """
    x, y = load()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(TEST_FRACTION * len(x))
    test, pool = order[:n_test], order[n_test:]
    if n_participants < 1 or len(pool) < 2 * n_participants:
        raise ValueError(
            f"{len(pool)} training rows cannot make {n_participants} shards of at least 2 rows"
        )
    shards = []
    for part in np.array_split(pool, n_participants):
        n_val = min(len(part) - 1, max(1, round(VAL_FRACTION * len(part))))
        val, train = part[:n_val], part[n_val:]
        shards.append(Shard(x[train], y[train], x[val], y[val]))
    return Split(x[test], y[test], shards)
