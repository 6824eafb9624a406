"""The Rondo side's clients: N ``rondo.run_participant`` loops in threads of this one process.

Each thread runs dummy.py's ``Dummy`` participant (the same arithmetic as the Flower clients).
For the where-does-the-time-go breakdown it also records, in Unix time, when each participant's
``train_round`` starts (its download is then complete and decoded) and ends, and when the
SDK logs the upload as done, and writes them to ``--events`` as JSON. Exits 0 once every
participant was told "finish", 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import workload

import rondo

UPLOADED = re.compile(r"^dummy-(\d+): trained round (\d+)$")


class EventLog(logging.Handler):
    """Keeps the time of the SDK's "dummy-i: trained round r" message (logged after upload)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__(level=logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        match = UPLOADED.match(record.getMessage())
        if match:
            self.events.append(
                {
                    "index": int(match[1]),
                    "round": int(match[2]),
                    "what": "uploaded",
                    "at": record.created,
                }
            )


def timed(participant: Any, events: list[dict[str, Any]]) -> Any:
    """Wrap ``participant.train_round`` to record when it starts and returns."""
    inner = participant.train_round

    def train_round(weights: rondo.Weights, round: int) -> Any:
        start = time.time()
        result = inner(weights, round)
        events.append(
            {"index": participant.index, "round": round, "what": "train_start", "at": start}
        )
        events.append(
            {"index": participant.index, "round": round, "what": "train_end", "at": time.time()}
        )
        return result

    participant.train_round = train_round
    return participant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator-url", required=True)
    workload.add_client_arguments(parser)
    parser.add_argument("--heartbeat-period", type=float, required=True)
    parser.add_argument("--events", type=Path, required=True)
    args = parser.parse_args()

    dummy = workload.dummy()
    if args.import_only:
        return 0

    events: list[dict[str, Any]] = []  # list.append is atomic under the GIL
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rondo_log = logging.getLogger("rondo")
    rondo_log.setLevel(logging.INFO)
    rondo_log.addHandler(EventLog(events))
    rondo_log.propagate = False  # INFO for the timings, not for the log file

    reports: dict[int, rondo.ParticipantReport] = {}
    failures: dict[int, BaseException] = {}

    def participate(index: int) -> None:
        try:
            reports[index] = rondo.run_participant(
                timed(dummy.Dummy(index, args.n_elements), events),
                args.coordinator_url,
                heartbeat_period=args.heartbeat_period,
                name=f"dummy-{index}",
            )
        except BaseException as exc:
            failures[index] = exc

    workload.run_clients(participate, args, "dummy")
    args.events.write_text(json.dumps(events))

    for index, exc in sorted(failures.items()):
        print(f"dummy-{index} failed: {exc!r}", file=sys.stderr)
    unfinished = sorted(i for i, r in reports.items() if r.final_action != "finish")
    for index in unfinished:
        print(f"dummy-{index} ended with {reports[index].final_action!r}", file=sys.stderr)
    return 1 if failures or unfinished else 0


if __name__ == "__main__":
    workload.exit_now(main())
