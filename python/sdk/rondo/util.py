"""Small helpers shared by the SDK and the examples."""

from __future__ import annotations

import random
import re
from decimal import Decimal

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a human-readable byte size into a number of bytes.

    ``kB``/``MB``/``GB``/``TB`` are powers of 1000, ``KiB``/``MiB``/``GiB``/``TiB`` powers of
    1024, ``B`` or no unit means bytes. Units are case-insensitive and fractions are allowed
    (``"1.5MB"``); the result is rounded down to whole bytes.

    Raises:
        ValueError: the text is not a non-negative number followed by a known unit.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number and a unit such as 512B, 1kB, 10MB, 1GiB"
        )
    # Decimal, not float, so that e.g. 0.1MB is exactly 100000 bytes.
    return int(Decimal(match.group(1)) * _UNITS[unit])


class Backoff:
    """The SDK's one retry policy: exponential backoff with jitter.

    Delays start at ``initial`` seconds (or ``maximum``, if smaller) and double up to
    ``maximum``; each is drawn uniformly
    from the upper half of the current step, so that many participants that lost the
    coordinator together do not come back in lock-step. With ``attempts``, :meth:`next_delay`
    returns ``None`` once that many delays were handed out.
    """

    def __init__(self, initial: float, maximum: float, attempts: int | None = None) -> None:
        if not (initial > 0 and maximum > 0):
            raise ValueError(f"delays must be positive, got {initial} and {maximum}")
        self._step = min(initial, maximum)
        self._maximum = maximum
        self._left = attempts

    def next_delay(self) -> float | None:
        """The pause before the next attempt, or ``None`` when no attempt is left."""
        if self._left is not None:
            if self._left <= 0:
                return None
            self._left -= 1
        step = self._step
        self._step = min(2 * step, self._maximum)
        return random.uniform(step / 2, step)
