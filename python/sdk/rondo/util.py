"""Small helpers shared by the SDK and the examples."""

from __future__ import annotations

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
