"""Weighted FedAvg (McMahan et al. 2017): ``Σ nᵢ·wᵢ / Σ nᵢ``, folded as updates arrive."""

from __future__ import annotations

from functools import partial

import numpy as np

from .base import BLOCK, Aggregator, Update, Weights, over_cores


class WeightedAverage(Aggregator):
    """The sample-weighted average of the round's updates, summed in float64 as each update
    arrives, then cast back to the model's dtypes. Memory: a float64 copy of the model (and,
    when the aggregator offers no :attr:`next_model`, one in its dtypes), however many updates,
    kept from round to round (reusing memory already mapped is much cheaper than mapping fresh
    memory in, on the path of every round's close).
    Large tensors are summed in parts on every core (:func:`.base.over_cores`)."""

    holds_updates = False

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0
        self._model: dict[str, np.ndarray] = {}

    def start_round(self, round: int, global_model: Weights | None) -> None:
        # Tensors the model no longer has (or whose shape changed) are dropped.
        old, self._sums, self._dtypes, self._total = self._sums, {}, {}, 0
        for name, weights in (global_model or {}).items():
            sums = old.get(name)
            if sums is not None and sums.shape == weights.shape:
                sums.fill(0.0)
                self._sums[name] = sums

    def add_update(self, update: Update) -> None:
        n = update.n_samples
        if n <= 0:
            return
        for name, w in update.weights.items():
            sums = self._sums.get(name)
            if sums is None:
                # An array even for a 0-d tensor (where arithmetic gives scalars), so that the
                # sums below are in place.
                sums = self._sums[name] = np.zeros(w.shape, np.float64)
            self._dtypes[name] = w.dtype
            over_cores(w.size, partial(add_weighted, sums.reshape(-1), w.reshape(-1), n))
        self._total += n

    def average(self) -> dict[str, np.ndarray]:
        """The round's weighted average, in float64 (the sums are divided in place: call once
        per round)."""
        if self._total == 0:
            raise ValueError("no update with a positive sample count was added")
        return {name: np.divide(s, self._total, out=s) for name, s in self._sums.items()}

    def finish_round(self) -> Weights:
        """The average, in the model's dtypes, written into :attr:`next_model` when the
        aggregator offers it (no copy), else into arrays of this object's that the next round
        reuses: copy what you keep."""
        if self._total == 0:
            raise ValueError("no update with a positive sample count was added")
        model = {}
        for name, sums in self._sums.items():
            out = (self.next_model or self._model).get(name)
            if out is None or out.shape != sums.shape or out.dtype != self._dtypes[name]:
                out = self._model[name] = np.empty(sums.shape, self._dtypes[name])
            divide = partial(divide_into, out.reshape(-1), sums.reshape(-1), self._total)
            over_cores(sums.size, divide)
            model[name] = out
        return model


def add_weighted(sums: np.ndarray, w: np.ndarray, n: int, start: int, stop: int) -> None:
    """``sums[start:stop] += n * w[start:stop]`` in float64, block by block through a small
    scratch: one pass over the sums and no model-sized temporary."""
    scratch = np.empty(min(BLOCK, stop - start), np.float64)
    for lo in range(start, stop, BLOCK):
        block = slice(lo, min(lo + BLOCK, stop))
        product = scratch[: block.stop - block.start]
        np.multiply(w[block], n, out=product, dtype=np.float64)
        np.add(sums[block], product, out=sums[block])


def divide_into(out: np.ndarray, sums: np.ndarray, total: int, start: int, stop: int) -> None:
    """``out[start:stop] = sums[start:stop] / total``, divided and cast in one pass."""
    part = slice(start, stop)
    np.divide(sums[part], total, out=out[part], casting="same_kind")
