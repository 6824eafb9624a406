"""``digits-report``: follow a digits federation, print each round's accuracy as it closes,
then the final global model's test accuracy beside a centrally trained model's.

Per round: the sample-weighted means (weights: ``n_samples``, as FedAvg weighs the updates)
of what the participants reported with their updates, on their own validation slices: the
accuracy of the global model they received (that is, of the previous round's aggregate), and
after their local training. At the end the final global model is downloaded from the
aggregator (``GET /v1/model``), put into an ``SGDClassifier`` and scored on the held-out test
set; the same classifier trained centrally on the union of the shards, for the same total
number of epochs, is scored on the same test set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .participant import DEFAULT_EPOCHS, positive_float, positive_int

POLL_SECS = 0.25
PER_ROUND = ("loss", "val_loss", "accuracy", "global_accuracy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="digits-report",
        description="Follow a digits federation; print accuracy per round and the final "
        "federated test accuracy beside a centrally trained model's.",
    )
    parser.add_argument("--number-of-participants", type=positive_int, required=True,
                        metavar="N")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (default: 0)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="E",
                        help="the participants' local epochs per round")  # fmt: skip
    parser.add_argument("--coordinator-url", default="http://127.0.0.1:8081", metavar="URL")
    parser.add_argument("--aggregator-url", default=None, metavar="URL",
                        help="default: the one the coordinator names")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument("--status-file", type=Path, default=None, metavar="PATH",
                        help="write the final coordinator status here once finished")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECS")
    parser.add_argument(
        "--with-participants", action="store_true",
        help="also run the N participants, as threads of this process (one interpreter and "
        "one scikit-learn import instead of N: what the demo does to start quickly)",
    )  # fmt: skip
    return parser.parse_args(argv)


class ParticipantThreads:
    """The N participants of a federation as threads of this process."""

    def __init__(self, n: int, seed: int, epochs: int, coordinator_url: str) -> None:
        import threading

        import rondo

        from .participant import make_participant

        self.stop = threading.Event()
        self.failures: dict[int, BaseException] = {}
        self.reports: dict[int, rondo.ParticipantReport] = {}
        participants = [make_participant(k, n, seed, epochs) for k in range(n)]

        def run(k: int) -> None:
            try:
                self.reports[k] = rondo.run_participant(
                    participants[k], coordinator_url, name=f"digits-{k}", stop_event=self.stop
                )
            except BaseException as exc:  # reported by check(), not lost in the thread
                self.failures[k] = exc

        self.threads = [
            threading.Thread(target=run, args=(k,), name=f"digits-{k}", daemon=True)
            for k in range(n)
        ]
        for thread in self.threads:
            thread.start()

    def check(self) -> None:
        """Raise if a participant failed, or (after the end) did not finish."""
        if self.failures:
            k, exc = min(self.failures.items())
            raise RuntimeError(f"participant {k} failed: {exc!r}") from exc

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
        self.check()
        unfinished = [k for k, r in sorted(self.reports.items()) if r.final_action != "finish"]
        if unfinished or len(self.reports) < len(self.threads):
            raise RuntimeError(f"participants did not finish: {unfinished or 'some'}")


def get_status(coordinator_url: str) -> dict[str, Any]:
    from rondo import HttpClient

    with HttpClient() as http:
        status: dict[str, Any] = http.call(
            "GET", f"{coordinator_url.rstrip('/')}/v1/status", timeout=10
        )
    return status


def aggregated_rounds(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Training rounds (>= 1) that closed with a new model, in order."""
    records = [
        r for r in status.get("history", []) if r.get("outcome") == "aggregated" and r["round"]
    ]
    return sorted(records, key=lambda r: r["round"])


def round_means(record: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {"participants": float(len(record.get("deliveries", [])))}
    for key in PER_ROUND:
        pairs = [
            (float(d["n_samples"]), float(d["metrics"][key]))
            for d in record.get("deliveries", [])
            if key in d.get("metrics", {})
        ]
        total = sum(n for n, _ in pairs)
        if total > 0:
            out[key] = sum(n * v for n, v in pairs) / total
    return out


def describe(round_: int, rounds: int, means: Mapping[str, float]) -> str:
    text = f"round {round_}/{rounds}: {int(means['participants'])} updates"
    if "accuracy" in means:
        text += f", validation accuracy {means['accuracy']:.3f} after local training"
    if "global_accuracy" in means:
        text += f" (global model received: {means['global_accuracy']:.3f})"
    return text


def follow(
    coordinator_url: str, timeout: float, participants: ParticipantThreads | None = None
) -> dict[str, Any]:
    """Poll the status until the federation is finished, printing each round as it closes."""
    from rondo import NetworkError

    deadline = time.monotonic() + timeout
    printed: set[int] = set()
    unreachable_since: float | None = None
    while True:
        try:
            status = get_status(coordinator_url)
            unreachable_since = None
        except NetworkError:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > 30:
                raise
            time.sleep(POLL_SECS)
            continue
        for record in aggregated_rounds(status):
            if record["round"] not in printed:
                printed.add(record["round"])
                means = round_means(record)
                print(describe(record["round"], status.get("rounds", 0), means), flush=True)
        if status.get("phase") == "finished":
            return status
        if participants is not None:
            participants.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the federation did not finish within {timeout:g} s")
        time.sleep(POLL_SECS)


def score(
    status: Mapping[str, Any],
    n_participants: int,
    seed: int,
    epochs: int,
    aggregator_url: str | None = None,
) -> dict[str, Any]:
    import numpy as np

    import rondo.models
    import rondo.sklearn

    from . import data, model

    split = data.split(n_participants, seed)
    url = aggregator_url or status.get("aggregator_url")
    if not url:
        raise ValueError("the coordinator does not name its aggregator; pass --aggregator-url")
    final = rondo.models.fetch_model(url)
    federated = model.new_model()
    rondo.sklearn.set_weights(federated, final.weights, classes=data.CLASSES)
    rounds = aggregated_rounds(status)
    total_epochs = max(1, len(rounds)) * epochs
    central = model.new_model()
    x = np.concatenate([s.x for s in split.shards])
    y = np.concatenate([s.y for s in split.shards])
    model.train(central, x, y, total_epochs, seed=seed)
    return {
        "participants": n_participants,
        "seed": seed,
        "local_epochs": epochs,
        "rounds": [{"round": r["round"], **round_means(r)} for r in rounds],
        "final_model_round": final.round,
        "test_rows": len(split.y_test),
        "federated_test_accuracy": model.accuracy(federated, split.x_test, split.y_test),
        "central_epochs": total_epochs,
        "central_test_accuracy": model.accuracy(central, split.x_test, split.y_test),
    }


def print_report(results: Mapping[str, Any]) -> None:
    fed, central = results["federated_test_accuracy"], results["central_test_accuracy"]
    print(
        f"test accuracy on {results['test_rows']} held-out digits: federated {fed:.3f} "
        f"(final global model of round {results['final_model_round']}, "
        f"{results['participants']} participants)   central {central:.3f} (same "
        f"SGDClassifier, union of the shards, {results['central_epochs']} epochs)   "
        f"difference {100 * (fed - central):+.1f} points"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from rondo import RondoError
    except ImportError:
        print("error: the Rondo SDK is not installed: pip install -e python/sdk", file=sys.stderr)
        return 2
    participants = None
    try:
        if args.with_participants:
            participants = ParticipantThreads(
                args.number_of_participants, args.seed, args.epochs, args.coordinator_url
            )
        status = follow(args.coordinator_url, args.timeout, participants)
        if participants is not None:
            participants.join()
        if args.status_file is not None:
            args.status_file.parent.mkdir(parents=True, exist_ok=True)
            args.status_file.write_text(json.dumps(status, indent=1) + "\n")
        if not aggregated_rounds(status):
            print("error: the federation finished without any aggregated round", file=sys.stderr)
            return 1
        results = score(
            status, args.number_of_participants, args.seed, args.epochs, args.aggregator_url
        )
    except (RondoError, TimeoutError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if participants is not None:
            participants.stop.set()
    print_report(results)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
