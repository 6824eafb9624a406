"""Weighted FedAvg (McMahan et al. 2017): ``Σ nᵢ·wᵢ / Σ nᵢ``, folded as updates arrive."""

from __future__ import annotations

import numpy as np

from .base import Aggregator, Update, Weights

BLOCK = 1 << 16
"""Elements weighted at a time (512 KiB of float64: stays in cache)."""


class WeightedAverage(Aggregator):
    """The sample-weighted average of the round's updates, summed in float64 as each update
    arrives, then cast back to the model's dtypes. Memory: a float64 copy of the model and one
    in its dtypes, however many updates, kept from round to round (reusing memory already
    mapped is much cheaper than mapping fresh memory in, on the path of every round's close)."""

    holds_updates = False

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0
        self._scratch = np.empty(BLOCK, np.float64)
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
            # `sums += n * w` block by block, through a small float64 scratch: one pass over
            # the sums and no model-sized temporary.
            flat_w, flat_sums = w.reshape(-1), sums.reshape(-1)
            for start in range(0, flat_w.size, BLOCK):
                block = slice(start, start + BLOCK)
                product = self._scratch[: len(flat_w[block])]
                np.multiply(flat_w[block], n, out=product, dtype=np.float64)
                np.add(flat_sums[block], product, out=flat_sums[block])
        self._total += n

    def average(self) -> dict[str, np.ndarray]:
        """The round's weighted average, in float64 (the sums are divided in place: call once
        per round)."""
        if self._total == 0:
            raise ValueError("no update with a positive sample count was added")
        return {name: np.divide(s, self._total, out=s) for name, s in self._sums.items()}

    def finish_round(self) -> Weights:
        """The average, in the model's dtypes. The arrays are this object's and are reused by
        the next round (the aggregator copies them at once): copy what you keep."""
        if self._total == 0:
            raise ValueError("no update with a positive sample count was added")
        model = {}
        for name, sums in self._sums.items():
            out = self._model.get(name)
            if out is None or out.shape != sums.shape or out.dtype != self._dtypes[name]:
                out = self._model[name] = np.empty(sums.shape, self._dtypes[name])
            # Divided and cast in one pass, into memory already mapped.
            np.divide(sums, self._total, out=out, casting="same_kind")
            model[name] = out
        return model
