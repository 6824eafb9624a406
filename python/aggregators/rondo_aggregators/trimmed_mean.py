"""Coordinate-wise trimmed mean (Yin et al. 2018): for every value, drop the ``k`` largest and
the ``k`` smallest over the round's updates and average the rest, ``k = floor(beta · n)``."""

from __future__ import annotations

import math

import numpy as np

from .base import Aggregator, Update, Weights, as_dtype, stacked


class TrimmedMean(Aggregator):
    """The ``beta``-trimmed mean of the round's ``n`` updates, per coordinate: ``floor(beta·n)``
    values are dropped at each end (rounded down, so a small round may drop none), the rest
    averaged without sample weights. ``0 <= beta < 0.5``. Holds every update."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"option beta = {beta} must be in [0, 0.5)")
        self.beta = beta
        self._updates: list[Update] = []

    def start_round(self, round: int, global_model: Weights | None) -> None:
        self._updates = []

    def add_update(self, update: Update) -> None:
        self._updates.append(update)

    def finish_round(self) -> Weights:
        updates, self._updates = self._updates, []
        n = len(updates)
        if n == 0:
            raise ValueError("the trimmed mean of no update is undefined")
        k = math.floor(self.beta * n)
        model = {}
        for name, w in updates[0].weights.items():
            ordered = np.sort(stacked(updates, name), axis=0)
            model[name] = as_dtype(ordered[k : n - k].mean(axis=0), w.dtype)
        return model
