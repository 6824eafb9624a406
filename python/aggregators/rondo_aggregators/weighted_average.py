"""Weighted FedAvg (McMahan et al. 2017): ``Σ nᵢ·wᵢ / Σ nᵢ``, folded as updates arrive."""

from __future__ import annotations

import numpy as np

from .base import Aggregator, Update, Weights, as_dtype


class WeightedAverage(Aggregator):
    """The sample-weighted average of the round's updates, summed in float64 as each update
    arrives (memory: one float64 copy of the model, however many updates), then cast back to
    the model's dtypes."""

    holds_updates = False

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0

    def start_round(self, round: int, global_model: Weights | None) -> None:
        self._sums, self._dtypes, self._total = {}, {}, 0

    def add_update(self, update: Update) -> None:
        n = update.n_samples
        if n <= 0:
            return
        for name, w in update.weights.items():
            total = self._sums.get(name)
            if total is None:
                # An array even for a 0-d tensor (where arithmetic gives scalars), so that the
                # sums below are in place.
                total = self._sums[name] = np.zeros(w.shape, np.float64)
                self._dtypes[name] = w.dtype
            total += np.multiply(w, n, dtype=np.float64)
        self._total += n

    def average(self) -> dict[str, np.ndarray]:
        """The round's weighted average, in float64 (the sums are divided in place: call once
        per round)."""
        if self._total == 0:
            raise ValueError("no update with a positive sample count was added")
        return {name: np.divide(s, self._total, out=s) for name, s in self._sums.items()}

    def finish_round(self) -> Weights:
        average = self.average()
        model = {name: as_dtype(a, self._dtypes[name]) for name, a in average.items()}
        self._sums = {}
        return model
