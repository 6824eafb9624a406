"""Coordinate-wise median (Yin et al. 2018): every value of the next model is the median of
that value over the round's updates (sample counts are ignored, as in the paper)."""

from __future__ import annotations

import numpy as np

from .base import Aggregator, Update, Weights, as_dtype, stacked


class Median(Aggregator):
    """The coordinate-wise median of the round's updates; with an even count, the mean of the
    two middle values. Holds every update until the round closes."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[Update] = []

    def start_round(self, round: int, global_model: Weights | None) -> None:
        self._updates = []

    def add_update(self, update: Update) -> None:
        self._updates.append(update)

    def finish_round(self) -> Weights:
        updates, self._updates = self._updates, []
        if not updates:
            raise ValueError("the median of no update is undefined")
        first = updates[0].weights
        return {
            name: as_dtype(np.median(stacked(updates, name), axis=0), w.dtype)
            for name, w in first.items()
        }
