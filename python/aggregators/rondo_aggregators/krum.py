"""Krum (Blanchard et al. 2017): the update closest to its neighbours is the next model."""

from __future__ import annotations

import numpy as np

from .base import Aggregator, Update, Weights, option_count


class Krum(Aggregator):
    """Of the round's ``n`` updates, at most ``f`` of them Byzantine, picks the one whose summed
    squared distance to its ``n - f - 2`` nearest other updates is smallest, and returns it
    as it is (ties: the first to arrive). Needs ``n > 2f + 2``; a round with fewer updates
    fails with that reason. Holds every update."""

    def __init__(self, f: float = 1) -> None:
        super().__init__()
        self.f = option_count("f", f)
        self._updates: list[Update] = []

    def start_round(self, round: int, global_model: Weights | None) -> None:
        self._updates = []

    def add_update(self, update: Update) -> None:
        self._updates.append(update)

    def scores(self, updates: list[Update]) -> list[float]:
        """Each update's Krum score: the sum of its ``n - f - 2`` smallest squared distances."""
        names = sorted(updates[0].weights)
        vectors = [
            np.concatenate([np.asarray(u.weights[k], np.float64).ravel() for k in names])
            for u in updates
        ]
        n = len(vectors)
        distances = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                d = float(np.sum((vectors[i] - vectors[j]) ** 2))
                distances[i, j] = distances[j, i] = d
        closest = n - self.f - 2
        return [float(np.sort(np.delete(distances[i], i))[:closest].sum()) for i in range(n)]

    def finish_round(self) -> Weights:
        updates, self._updates = self._updates, []
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise ValueError(
                f"Krum with f = {self.f} needs more than 2f + 2 = {2 * self.f + 2} updates, "
                f"the round has {n}"
            )
        best = updates[int(np.argmin(self.scores(updates)))]
        return {name: np.array(w) for name, w in best.weights.items()}
