"""What both systems are asked to do, shared by the benchmark and its child processes.

Client i (0-based) of N "trains" by adding i + 1 to every weight of a float32 model and reports
n_i = 10 * (i + 1) samples, exactly like ``python/client_examples/dummy.py``, whose ``layout``,
``n_samples`` and ``Dummy`` are reused here so that Rondo and Flower run the same arithmetic.
Starting from an all-zero model, every weight after R rounds of FedAvg is therefore
R * sum(n_i * (i + 1)) / sum(n_i).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DUMMY_PATH = REPO / "python" / "client_examples" / "dummy.py"


@cache
def dummy() -> ModuleType:
    """The dummy example, imported from its file (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("rondo_dummy_example", DUMMY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def zero_model(n_elements: int) -> dict[str, np.ndarray]:
    """The initial global model of both systems: all zeros, in dummy.py's layout."""
    return {name: np.zeros(n, np.float32) for name, n in dummy().layout(n_elements).items()}


def train(weights: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Client ``index``'s update: the same single pass as dummy.py's ``train_round``."""
    delta = np.float32(index + 1)
    return {name: np.add(array, delta, dtype=np.float32) for name, array in weights.items()}


def n_samples(index: int) -> int:
    n: int = dummy().n_samples(index)
    return n


def expected_value(n_clients: int, rounds: int) -> float:
    """Every weight of the final model when all clients deliver in every round."""
    weights = [n_samples(i) for i in range(n_clients)]
    per_round = sum(n * (i + 1) for i, n in enumerate(weights)) / sum(weights)
    return rounds * per_round


def tolerance(expected: float, rounds: int) -> float:
    """float32 rounding allowance, as in dummy.py's check."""
    return 1e-5 * max(1.0, abs(expected)) * max(1, rounds)


def value_range(arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    """(min, max) over every element; min and max need no temporary copy of a big model."""
    return (
        min(float(a.min()) for a in arrays.values()),
        max(float(a.max()) for a in arrays.values()),
    )


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every client harness takes: which clients it runs, on what model."""
    parser.add_argument("--clients", type=int, required=True, help="how many, in threads")
    parser.add_argument(
        "--first-index", type=int, default=0, help="index of this process's first client"
    )
    parser.add_argument("--n-elements", type=int, required=True)
    parser.add_argument(
        "--import-only",
        action="store_true",
        help="exit once this script's imports are done: what importing alone takes",
    )


def run_clients(client: Callable[[int], None], args: argparse.Namespace, name: str) -> None:
    """Run ``client(index)`` for each of this process's clients, each in a thread, until all end."""
    threads = [
        threading.Thread(target=client, args=(i,), name=f"{name}-{i}")
        for i in range(args.first_index, args.first_index + args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def exit_now(code: int) -> NoReturn:
    """End a harness process once its results are written, skipping interpreter teardown.

    The benchmark's wall time ends when the last harness process exits. With numpy, grpc and
    the like loaded, tearing the interpreter down takes 20-70 ms here, which is no part of
    either federation; every harness (both systems' clients, Flower's server) ends this way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The process's peak resident set size (VmHWM) so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
