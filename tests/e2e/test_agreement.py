"""The coordinator's history agrees with the model the aggregator built: every aggregated round's
deliveries are the updates folded into it. Real binaries, real SDK participants."""

from __future__ import annotations

import threading
import time

import numpy as np
import requests
from test_rounds import Adder, final_model, run_in_thread


def watch_accepted(federation, stop: threading.Event, seen: dict) -> threading.Thread:
    """Samples the aggregator's accepted set of the open round until `stop`, keeping for each
    `(round, attempt)` every participant it ever listed."""

    def target() -> None:
        while not stop.is_set():
            try:
                status = federation.aggregator_status()
            except requests.RequestException:
                continue
            if status["open_round"] is not None:
                key = (status["open_round"]["round"], status["open_round"]["attempt"])
                seen.setdefault(key, set()).update(status["accepted"])
            time.sleep(0.01)

    thread = threading.Thread(target=target, name="watcher", daemon=True)
    thread.start()
    return thread


def test_history_deliveries_are_what_the_model_was_built_from(start_federation):
    federation = start_federation(
        coordinator={
            "federation.rounds": 3,
            "federation.min_clients": 3,
            "federation.heartbeat_period_secs": 0.2,
        }
    )
    people = {
        "a": Adder(1.0, 10, train_secs=0.1),
        "b": Adder(2.0, 30, train_secs=0.1),
        "c": Adder(5.0, 7, train_secs=0.1),
    }
    stop = threading.Event()
    seen: dict = {}
    watcher = watch_accepted(federation, stop, seen)
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    stop.set()
    watcher.join(timeout=5)
    for thread in threads:
        thread.join(timeout=10)

    name_of = {p["participant_id"]: p["name"] for p in status["participants"]}
    aggregated = [e for e in status["history"] if e["outcome"] == "aggregated"]
    assert [e["round"] for e in aggregated] == [0, 1, 2, 3]
    assert status["history_forgotten"] == 0
    value = 0.0
    for entry in aggregated:
        delivered = entry["delivered"]
        assert delivered == [d["participant_id"] for d in entry["deliveries"]]
        assert not set(delivered) & set(entry["dropped"])
        # Whatever the aggregator listed as accepted in this round is in the record.
        assert seen.get((entry["round"], entry["attempt"]), set()) <= set(delivered), entry
        if entry["round"] == 0:
            # The initial weights: one participant's, not trained.
            assert len(delivered) == 1
            continue
        for delivery in entry["deliveries"]:
            person = people[name_of[delivery["participant_id"]]]
            assert delivery["n_samples"] == person.n
            assert delivery["metrics"] == {"loss": 0.5}
            assert delivery["metrics_dropped"] == 0
        assert len(delivered) == 3
        # FedAvg replayed from the record alone (ids and sample counts) gives the model.
        total = sum(d["n_samples"] for d in entry["deliveries"])
        value = (
            sum(
                d["n_samples"] * (value + people[name_of[d["participant_id"]]].delta)
                for d in entry["deliveries"]
            )
            / total
        )
    for array in final_model(federation).values():
        np.testing.assert_allclose(array, value, rtol=1e-6)
