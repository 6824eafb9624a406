#!/usr/bin/env python3
"""Dummy Rondo participants, for trying out and checking a deployment end to end.

Runs N participants in threads. Participant i (0-based) "trains" on n_i = 10 * (i + 1) samples
by adding i + 1 to every weight, starting from an all-zero float32 model. The final global
model is therefore predictable from the coordinator's history alone: every aggregated round r
with delivering set D_r adds sum(n_i * (i + 1)) / sum(n_i) over D_r. ``--check-expected``
compares the aggregator's final model with that.

    pip install -e python/sdk
    python python/client_examples/dummy.py --number-of-participants 10 --model-size 10MB \\
        --check-expected
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import rondo
    from rondo.safetensors_io import decode
    from rondo.transport import HttpClient
    from rondo.util import parse_size
except ImportError:  # pragma: no cover - a message beats a traceback here
    sys.exit("dummy.py needs the Rondo SDK: pip install -e python/sdk")

KERNEL, BIAS = "dense/kernel", "dense/bias"


def layout(n_elements: int) -> dict[str, int]:
    """Tensor name -> element count: most of the model in the kernel, a small bias."""
    n_bias = min(16, n_elements // 2)
    sizes = {KERNEL: n_elements - n_bias}
    if n_bias:
        sizes[BIAS] = n_bias
    return sizes


def n_samples(index: int) -> int:
    return 10 * (index + 1)


class Dummy(rondo.Participant):
    """Participant ``index``: adds ``index + 1`` to every weight."""

    def __init__(self, index: int, n_elements: int, train_secs: float = 0.0) -> None:
        self.index = index
        self.n_elements = n_elements
        self.train_secs = train_secs

    def initial_weights(self) -> rondo.Weights:
        # np.zeros maps zeroed pages lazily: a 1 GB model costs nothing until it is sent.
        return {name: np.zeros(n, np.float32) for name, n in layout(self.n_elements).items()}

    def train_round(
        self, weights: rondo.Weights, round: int
    ) -> tuple[rondo.Weights, int, dict[str, float]]:
        if self.train_secs:
            time.sleep(self.train_secs)  # as long as real training would take
        delta = np.float32(self.index + 1)
        # The downloaded arrays are writable views of the download buffer: update them in
        # place and send them back, so a round holds one copy of the model, not two.
        new = {}
        for name, array in weights.items():
            if array.flags.writeable:
                array += delta
                new[name] = array
            else:  # e.g. decoded from bytes: one new array
                new[name] = np.add(array, delta, dtype=np.float32)
        return new, n_samples(self.index), {"loss": 1.0 / round}


# --- command line --------------------------------------------------------------------------------


def model_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 4:
        raise argparse.ArgumentTypeError(
            f"{text!r} is smaller than one float32 (4 bytes); try e.g. 1kB, 10MB, 1GiB"
        )
    return size


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number-of-participants", type=positive(int), default=10, metavar="N")
    parser.add_argument(
        "--heartbeat-period", type=positive(float), default=1.0, metavar="SECS",
        help="seconds between heartbeats (default: 1.0)",
    )  # fmt: skip
    parser.add_argument("--coordinator-url", default="http://127.0.0.1:8081")
    parser.add_argument(
        "--model-size", type=model_size, default=parse_size("1kB"), metavar="SIZE",
        help="model size in bytes, e.g. 512B, 1kB, 10MB, 1GiB (kB/MB/GB: powers of 1000, "
        "KiB/MiB/GiB: powers of 1024; float32, so SIZE // 4 elements; default: 1kB)",
    )  # fmt: skip
    parser.add_argument(
        "--connect-timeout", type=positive(float), default=60.0, metavar="SECS",
        help="how long to wait for the coordinator to answer the first join (default: 60)",
    )  # fmt: skip
    parser.add_argument(
        "--train-secs", type=float, default=0.0, metavar="SECS",
        help="how long each round's training takes, as if it were real (default: 0)",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every SDK step")
    parser.add_argument(
        "--check-expected", action="store_true",
        help="at the end, check the final global model against the expected weighted average",
    )  # fmt: skip
    return parser.parse_args(argv)


# --- progress and checking -------------------------------------------------------------------


def get_status(coordinator_url: str) -> dict[str, Any]:
    with HttpClient() as http:
        status: dict[str, Any] = http.call(
            "GET", f"{coordinator_url.rstrip('/')}/v1/status", timeout=10
        )
    return status


def describe(entry: dict[str, Any], rounds: int) -> str:
    r = entry["round"]
    name = "round 0 (initial model)" if r == 0 else f"round {r}/{rounds}"
    if entry.get("attempt", 0) > 0:
        name += f" (rerun {entry['attempt']})"
    text = f"{name} closed: {len(entry['delivered'])} delivered, {len(entry['dropped'])} dropped"
    if entry["outcome"] != "aggregated":
        text += f", {entry['outcome']}: {entry.get('reason')}"
    return text


class Progress:
    """Prints each round once the coordinator's history shows it closed."""

    def __init__(self, coordinator_url: str) -> None:
        self.coordinator_url = coordinator_url
        self.printed: set[tuple[int, int]] = set()

    def poll(self) -> None:
        try:
            status = get_status(self.coordinator_url)
        except (rondo.RondoError, ValueError):
            return  # progress is best effort; the participants report real problems
        for entry in status.get("history", []):
            key = (entry["round"], entry.get("attempt", 0))
            # The running round is listed too, with no outcome yet.
            if entry.get("outcome") is not None and key not in self.printed:
                self.printed.add(key)
                print(describe(entry, status.get("rounds", 0)), flush=True)


def check_expected(
    coordinator_url: str, n_elements: int, reports: dict[int, rondo.ParticipantReport]
) -> bool:
    """Compare the aggregator's final model with the one the history predicts."""
    status = get_status(coordinator_url)
    index_of = {pid: i for i, report in reports.items() for pid in report.participant_ids}
    for participant in status["participants"]:
        name = participant.get("name") or ""
        if name.startswith("dummy-") and name[6:].isdigit():
            index_of.setdefault(participant["participant_id"], int(name[6:]))

    history = sorted(status["history"], key=lambda e: (e["round"], e.get("attempt", 0)))
    aggregated = [e for e in history if e["outcome"] == "aggregated"]
    if not any(e["round"] == 0 for e in aggregated):
        print("cannot check: the initial model did not come from a dummy's round 0")
        return False
    expected = 0.0
    last_round = 0
    for entry in aggregated:
        if entry["round"] < 1:
            continue
        unknown = [pid for pid in entry["delivered"] if pid not in index_of]
        if unknown:
            print(f"round {entry['round']}: delivered by unknown participants {unknown}")
            return False
        indices = [index_of[pid] for pid in entry["delivered"]]
        weights = [n_samples(i) for i in indices]
        expected += sum(n * (i + 1) for n, i in zip(weights, indices, strict=True)) / sum(weights)
        last_round = entry["round"]

    url = f"{status['aggregator_url'].rstrip('/')}/v1/model"
    with HttpClient() as http:
        model, metadata = decode(http.download(url, timeout=600))
    sizes = layout(n_elements)
    shapes = {name: (array.dtype, array.shape) for name, array in model.items()}
    wanted = {name: (np.dtype(np.float32), (n,)) for name, n in sizes.items()}
    if shapes != wanted:
        print(f"final global model has tensors {shapes}, expected {wanted}")
        return False
    # Every element should equal `expected`; min and max suffice and need no temporary copy.
    error = max(
        max(float(array.max()) - expected, expected - float(array.min()))
        for array in model.values()
    )
    tolerance = 1e-5 * max(1.0, abs(expected)) * max(1, last_round)
    where = f"after round {last_round} (model metadata rondo.round={metadata.get('rondo.round')})"
    if error <= tolerance:
        print(
            f"final global model equals the expected weighted average (max abs error {error:.3g}; "
            f"expected value {expected:.6g} {where})"
        )
        return True
    print(
        f"final global model differs from the expected weighted average: max abs error "
        f"{error:.3g} > tolerance {tolerance:.3g}; expected {expected:.6g} {where}, "
        f"got values in [{min(float(a.min()) for a in model.values()):.6g}, "
        f"{max(float(a.max()) for a in model.values()):.6g}]"
    )
    return False


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rondo").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    n_elements = args.model_size // 4
    count = args.number_of_participants
    print(
        f"{count} participants, model of {n_elements} float32 ({4 * n_elements} bytes), "
        f"coordinator {args.coordinator_url}",
        flush=True,
    )

    stop = threading.Event()
    reports: dict[int, rondo.ParticipantReport] = {}
    failures: dict[int, BaseException] = {}

    def participate(index: int) -> None:
        try:
            reports[index] = rondo.run_participant(
                Dummy(index, n_elements, args.train_secs),
                args.coordinator_url,
                heartbeat_period=args.heartbeat_period,
                name=f"dummy-{index}",
                connect_timeout=args.connect_timeout,
                stop_event=stop,
            )
        except BaseException as exc:
            failures[index] = exc

    threads = [
        threading.Thread(target=participate, args=(i,), name=f"dummy-{i}") for i in range(count)
    ]
    for thread in threads:
        thread.start()
    progress = Progress(args.coordinator_url)
    try:
        while alive := [thread for thread in threads if thread.is_alive()]:
            alive[0].join(timeout=1.0)
            progress.poll()
    except KeyboardInterrupt:
        print("interrupted; stopping the participants", flush=True)
        stop.set()
        for thread in threads:
            thread.join()
        return 130
    progress.poll()

    for index, exc in sorted(failures.items()):
        print(f"dummy-{index} failed: {exc!r}")
    unfinished = [i for i, r in sorted(reports.items()) if r.final_action != "finish"]
    for index in unfinished:
        print(f"dummy-{index} ended with {reports[index].final_action!r}, not 'finish'")
    if failures or unfinished:
        return 1
    accepted = sum(len(r.rounds_trained) for r in reports.values())
    refused = sum(len(r.rejected_uploads) for r in reports.values())
    print(f"all {count} participants finished: {accepted} updates accepted, {refused} refused")

    if args.check_expected and not check_expected(args.coordinator_url, n_elements, reports):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
