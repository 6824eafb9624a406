"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): the server steps with Adam
on the pseudo-gradient ``Δ = weighted average of the updates - x``."""

from __future__ import annotations

import numpy as np

from .base import Weights, as_dtype
from .weighted_average import WeightedAverage


class FedAdam(WeightedAverage):
    """Each round, with ``x`` the global model the round started from::

        Δ = Σ nᵢ·wᵢ / Σ nᵢ - x
        m = β1·m + (1 - β1)·Δ          (m starts at 0)
        v = β2·v + (1 - β2)·Δ²         (v starts at τ²)
        x = x + η·m / (√v + τ)

    without bias correction, as in the paper. ``m`` and ``v`` live across rounds (float64);
    the average streams as in :class:`WeightedAverage`. A round that fails before its model is
    returned leaves them as they were."""

    def __init__(
        self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"option {name} = {value} must be in [0, 1)")
        for name, value in (("eta", eta), ("tau", tau)):
            if not value > 0.0:
                raise ValueError(f"option {name} = {value} must be > 0")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self._x: dict[str, np.ndarray] = {}

    def start_round(self, round: int, global_model: Weights | None) -> None:
        super().start_round(round, global_model)
        if global_model is None:
            raise ValueError("FedAdam steps from the global model, and there is none")
        self._x = {name: np.asarray(w, dtype=np.float64) for name, w in global_model.items()}
        self._dtypes = {name: w.dtype for name, w in global_model.items()}

    def finish_round(self) -> Weights:
        average = self.average()
        m, v, model = {}, {}, {}
        for name, x in self._x.items():
            delta = average[name] - x
            m[name] = self.beta1 * self.m.get(name, 0.0) + (1 - self.beta1) * delta
            v[name] = self.beta2 * self.v.get(name, self.tau**2) + (1 - self.beta2) * delta**2
            step = self.eta * m[name] / (np.sqrt(v[name]) + self.tau)
            model[name] = as_dtype(x + step, self._dtypes[name])
        # Only a round that produced its model moves the moments.
        self.m, self.v = m, v
        self._x = {}
        return model
