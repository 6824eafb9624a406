"""The interface between the Rondo aggregator and a rule written in Python."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

Weights = Mapping[str, np.ndarray]
"""A model or an update: tensor name -> array, in the model's dtype and shape."""


@dataclass(frozen=True)
class Update:
    """One accepted update of the round.

    ``weights`` are read-only arrays that are views over the aggregator's own buffers (nothing
    was copied). They stay valid as long as you reference them; copy what you change (e.g.
    ``w.astype(np.float64)``). Keeping them past :meth:`Aggregator.add_update` is fine only for
    a class whose ``holds_updates`` is true; drop them at the end of the round, or the memory
    stays taken.
    """

    participant_id: str
    weights: Weights
    n_samples: int
    """The number of samples the participant trained on (>= 0): FedAvg's weight."""
    metrics: Mapping[str, float]
    """What the participant reported (``rondo.metrics``), e.g. ``{"loss": 0.3}``."""


class Aggregator:
    """Base class of a Python aggregation rule.

    The aggregator calls, on one thread of its own, one call at a time::

        rule = MyRule(**options)                # once, at start-up
        rule.start_round(round, global_model)   # each training round (1, 2, ...)
        rule.add_update(update)                 # once per accepted update
        rule.finish_round()                     # -> the next global model

    ``finish_round`` must return exactly the model's tensors: the same names, dtypes and
    shapes as ``global_model``, every value finite. Anything else, an exception from any call,
    or a call running past ``[aggregation.python] timeout_secs`` fails the round (the reason,
    with the exception, goes to the aggregator's log and the coordinator's round history), the
    previous global model stays, and the coordinator runs the round again: ``start_round``
    then begins it afresh, so keep no state of a half-done round across it. State that lives
    across rounds (say, optimizer moments) belongs on ``self``, updated in ``finish_round``.

    Round 0, which makes the initial model, never reaches the rule.
    """

    holds_updates: ClassVar[bool] = True
    """Whether the rule keeps an update's arrays past :meth:`add_update` (a median needs every
    update at the end). ``False`` promises it does not (it folds each update into state of its
    own), which lets the aggregator reuse the update's buffer for the next upload at once."""

    next_model: Weights | None = None
    """Set by the aggregator for the length of :meth:`finish_round` (else ``None``): writable
    arrays over the next model's file, one per tensor in the model's dtype and shape, zeroed or
    not. A rule may write its result into them and return them: the aggregator then publishes
    them as they are, sparing a model-sized copy. Returning other arrays is as good, only
    slower. Keep no reference to them past the call (if you do, the aggregator copies the
    model out, and what you write there later goes nowhere)."""

    def __init__(self, **options: float) -> None:
        """Takes the rule's options (``[aggregation.options]``, every one a float). The base
        class knows none: a subclass declares its own as keyword arguments, so that an unknown
        option stops the aggregator at start-up."""
        if options:
            names = ", ".join(sorted(options))
            raise TypeError(f"{type(self).__name__} takes no option: {names}")

    def start_round(self, round: int, global_model: Weights | None) -> None:
        """A round begins from ``global_model`` (read-only views, valid as long as referenced;
        copy what you keep beyond the round). ``None`` only when there is no model yet."""

    def add_update(self, update: Update) -> None:
        """Takes one accepted update of the round."""
        raise NotImplementedError(f"{type(self).__name__}.add_update")

    def finish_round(self) -> Weights:
        """Returns the next global model."""
        raise NotImplementedError(f"{type(self).__name__}.finish_round")


def option_count(name: str, value: float, minimum: int = 0) -> int:
    """An option that must be a whole number (options arrive as floats)."""
    if value != int(value) or value < minimum:
        raise ValueError(f"option {name} = {value} must be a whole number >= {minimum}")
    return int(value)


def stacked(updates: list[Update], name: str) -> np.ndarray:
    """Tensor ``name`` of every update, as one float64 array with the updates on axis 0."""
    return np.stack([np.asarray(u.weights[name], dtype=np.float64) for u in updates])


def as_dtype(value: np.ndarray | np.generic, dtype: np.dtype) -> np.ndarray:
    """``value`` as an array of ``dtype``: numpy reductions over a 0-d tensor give scalars,
    and the aggregator wants arrays back."""
    return np.asarray(value).astype(dtype)


BLOCK = 1 << 16
"""Elements a pass over a tensor works on at a time (512 KiB of float64: stays in cache)."""

_CORES = os.cpu_count() or 1
_pool: ThreadPoolExecutor | None = None


def over_cores(size: int, work: Callable[[int, int], None]) -> None:
    """Runs ``work(start, stop)`` over ``range(size)`` cut into one contiguous part per core,
    in threads. numpy releases the GIL inside its loops, so a memory-bound pass (a weighted
    sum, a division) runs on every core; ``work`` must touch only its own part."""
    global _pool
    parts = min(_CORES, max(1, size // BLOCK))
    if parts == 1:
        work(0, size)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(_CORES, thread_name_prefix="rondo-aggregators")
    bounds = [size * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(work, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    try:
        for future in futures:
            future.result()
    finally:
        # Even when interrupted (a call past its timeout), no part is left running.
        wait(futures)
