"""What the commands share: argument types and turning expected failures into clear errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .data import DataError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body: a DataError or an unreachable service is one line on stderr and
    exit code 2 (a usage problem), not a traceback; Ctrl-C is exit code 130."""
    # Imported here: rondo's errors are what the network side raises.
    from rondo import RondoError

    try:
        return body()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RondoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
