"""Python aggregators that misbehave on purpose, for tests/e2e/test_python_aggregator.py.

The aggregator imports this module with this directory on PYTHONPATH. :class:`Faulty` is a
weighted average that fails in one way (option ``fail``, a number: see ``MODES``) in the first
attempt of round ``in_round`` only, so that the retried round succeeds.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from rondo_aggregators import Aggregator, Update, Weights
from rondo_aggregators.weighted_average import WeightedAverage

MODES = {
    1: "raise_in_start",
    2: "raise_in_add",
    3: "raise_in_finish",
    4: "missing_tensor",
    5: "extra_tensor",
    6: "wrong_shape",
    7: "wrong_dtype",
    8: "nan",
    9: "busy_past_timeout",  # pure Python, in finish_round
    10: "sleep_past_timeout",  # a blocking call (time.sleep), in add_update
    11: "not_a_mapping",
    12: "catches_everything_past_timeout",  # `except Exception` must not swallow the interrupt
}


class Faulty(WeightedAverage):
    def __init__(self, fail: float = 0, in_round: float = 1, hide_ml_dtypes: float = 0) -> None:
        super().__init__()
        if hide_ml_dtypes:
            # As if it were not installed: `import ml_dtypes` now raises ImportError.
            sys.modules["ml_dtypes"] = None  # type: ignore[assignment]
        self.mode = MODES.get(int(fail), "none")
        self.in_round = int(in_round)
        self.starts: dict[int, int] = {}
        self.failing = False

    def start_round(self, round: int, global_model: Weights | None) -> None:
        self.starts[round] = self.starts.get(round, 0) + 1
        self.failing = round == self.in_round and self.starts[round] == 1
        if self.failing and self.mode == "raise_in_start":
            raise RuntimeError(f"start_round refuses round {round}")
        super().start_round(round, global_model)

    def add_update(self, update: Update) -> None:
        if self.failing and self.mode == "raise_in_add":
            raise KeyError(f"no room for {update.participant_id}")
        if self.failing and self.mode == "sleep_past_timeout":
            time.sleep(3600)
        super().add_update(update)

    def finish_round(self) -> Weights:
        if not self.failing:
            return super().finish_round()
        model = dict(super().finish_round())
        name = sorted(model)[0]
        if self.mode == "raise_in_finish":
            raise ValueError("the average is not good enough")
        if self.mode == "missing_tensor":
            del model[name]
        elif self.mode == "extra_tensor":
            model["surprise"] = np.zeros(1, np.float32)
        elif self.mode == "wrong_shape":
            model[name] = np.zeros(model[name].size + 1, model[name].dtype)
        elif self.mode == "wrong_dtype":
            model[name] = model[name].astype(np.float64)
        elif self.mode == "nan":
            model[name] = model[name].copy()
            model[name].flat[0] = np.nan
        elif self.mode == "busy_past_timeout":
            while True:
                pass
        elif self.mode == "catches_everything_past_timeout":
            while True:
                try:
                    time.sleep(3600)
                except Exception:  # noqa: BLE001 - the point of this case
                    pass
        elif self.mode == "not_a_mapping":
            return [model[name]]  # type: ignore[return-value]
        return model


class NotAnAggregator:
    """Has the methods but not the base class."""

    def start_round(self, round, global_model):
        pass


class BrokenInit(Aggregator):
    def __init__(self, **options: float) -> None:
        raise RuntimeError("cannot start: no licence")


class BadHoldsUpdates(WeightedAverage):
    holds_updates = "sometimes"  # type: ignore[assignment]
