"""Training deadlines and the quorum, through the real services: a round stops waiting for
participants that went silent after downloading, closes at the quorum and says who missed the
deadline; a round that cannot reach its quorum fails, is run again, and aggregates once
participants are back. The global model is checked exactly against the updates delivered."""

from __future__ import annotations

import csv
import io

import numpy as np
import requests
from test_openapi import check_response, document
from test_rounds import Adder, final_model, run_in_thread

FAST = {
    "federation.rounds": 1,
    "federation.participants_ratio": 1.0,
    "federation.heartbeat_period_secs": 0.2,
    "federation.evaluate_every": 0,
}


def names_of(status: dict) -> dict[str, str]:
    return {p["participant_id"]: p["name"] for p in status["participants"]}


def weighted_average(delivered: list[Adder]) -> float:
    """What every weight of a model made from all-zero weights by one round of these holds."""
    total = sum(p.n for p in delivered)
    return sum(p.n * p.delta for p in delivered) / total


def listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def test_a_round_closes_at_the_quorum_after_the_training_deadline_naming_who_missed_it(
    start_federation,
):
    federation = start_federation(
        coordinator={
            **FAST,
            "federation.min_clients": 10,
            "federation.min_updates": 5,
            # Time enough for the 7 that train to deliver on a busy machine, but short.
            "federation.training_timeout_secs": 3,
            "federation.round_timeout_secs": 30,
            # Silent participants are not dropped before the deadline: they miss it.
            "federation.heartbeat_timeout_secs": 20,
        }
    )
    # p7, p8 and p9 download round 1's model, then stop heartbeating and never upload.
    people = {
        f"p{i}": Adder(float(i + 1), 10 * (i + 1), die_in_round=1 if i >= 7 else None)
        for i in range(10)
    }
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    status = federation.wait_for(lambda s: s["phase"] == "finished", timeout=30, what="round 1")
    for thread in threads:
        thread.join(timeout=10)

    name_of = names_of(status)
    round1 = next(e for e in status["history"] if e["round"] == 1)
    assert (round1["attempt"], round1["outcome"]) == (0, "aggregated"), round1
    assert round1["close_reason"] == "training_deadline", round1
    assert len(round1["selected"]) == 10
    assert sorted(name_of[i] for i in round1["started"]) == sorted(people)
    missed = [name_of[i] for i in round1["missed_deadline"]]
    assert sorted(missed) == ["p7", "p8", "p9"]
    assert sorted(name_of[i] for i in round1["delivered"]) == [f"p{i}" for i in range(7)]
    assert round1["dropped"] == []
    assert (round1["target"], round1["quorum"]) == (10, 5)
    assert round1["reason"] == (
        f"round 1: 7 of 10 updates; {listed(missed)} missed the training deadline (3 s)"
    )
    # It waited for the deadline, and not for the round's own timeout.
    assert 3 <= round1["duration_secs"] < 10, round1
    assert {reports[n].final_action for n in ("p7", "p8", "p9")} == {"stopped"}

    # The model is the sample-weighted average of exactly the 7 updates that were delivered.
    expected = weighted_average([people[f"p{i}"] for i in range(7)])
    for array in final_model(federation).values():
        np.testing.assert_allclose(array, expected, rtol=1e-6)

    # The same, in the history download, as JSON and as CSV, as the API document says.
    doc = document("coordinator")
    answer = requests.get(f"{federation.coordinator_url}/v1/history", timeout=5)
    check_response(doc, "/v1/history", "get", answer)
    line = next(r for r in answer.json()["rounds"] if r["round"] == 1)
    assert line["close_reason"] == "training_deadline"
    assert line["missed_deadline"] == round1["missed_deadline"]
    assert line["reason"] == round1["reason"]
    status_answer = requests.get(f"{federation.coordinator_url}/v1/status", timeout=5)
    check_response(doc, "/v1/status", "get", status_answer)
    text = requests.get(f"{federation.coordinator_url}/v1/history.csv", timeout=5)
    row = next(r for r in csv.DictReader(io.StringIO(text.text)) if r["round"] == "1")
    assert row["close_reason"] == "training_deadline"
    assert row["missed_deadline"].split(" ") == round1["missed_deadline"]


def test_a_round_short_of_its_quorum_fails_and_is_rerun_once_participants_are_back(
    start_federation,
):
    federation = start_federation(
        coordinator={
            **FAST,
            "federation.min_clients": 3,
            "federation.min_updates": 3,
            "federation.training_timeout_secs": 10,
            "federation.round_timeout_secs": 30,
            "federation.heartbeat_timeout_secs": 1.0,
        }
    )
    people = {
        "a": Adder(1.0, 10),
        "b": Adder(2.0, 30),
        "quitter": Adder(100.0, 50, die_in_round=1),
    }
    url = federation.coordinator_url
    reports: dict = {}
    threads = [run_in_thread(p, url, name, reports) for name, p in people.items()]

    def failed_attempt(status: dict) -> bool:
        return any(e["round"] == 1 and e["outcome"] == "failed" for e in status["history"])

    # The quitter is dropped a second after it fell silent: 2 updates at most, the quorum is 3.
    status = federation.wait_for(failed_attempt, timeout=30, what="round 1 to fail")
    failed = next(e for e in status["history"] if e["round"] == 1)
    name_of = names_of(status)
    assert (failed["attempt"], failed["close_reason"]) == (0, "quorum_unreachable"), failed
    assert [name_of[i] for i in failed["dropped"]] == ["quitter"]
    assert "short of the quorum of 3 (min_updates)" in failed["reason"], failed
    assert "quitter dropped (heartbeat timeout); the round is run again" in failed["reason"]
    assert failed["reason"].startswith("round 1 attempt 0 failed: "), failed
    # Two are left, fewer than min_clients: the rerun waits for a third.
    assert status["phase"] == "waiting_for_participants", status["phase"]
    assert (status["round"], status["attempt"]) == (1, 1)

    # The quitter comes back (a new process: it joins again, under a new id).
    people["quitter"] = Adder(4.0, 20)
    threads.append(run_in_thread(people["quitter"], url, "quitter", reports))
    status = federation.wait_for(lambda s: s["phase"] == "finished", timeout=30, what="rerun")
    for thread in threads:
        thread.join(timeout=10)

    rerun = next(e for e in status["history"] if (e["round"], e["attempt"]) == (1, 1))
    name_of = names_of(status)
    assert (rerun["outcome"], rerun["close_reason"]) == ("aggregated", "all_delivered"), rerun
    assert sorted(name_of[i] for i in rerun["delivered"]) == ["a", "b", "quitter"]
    assert rerun["reason"] == "round 1: 3 of 3 updates; every selected participant delivered"
    assert {r.final_action for r in reports.values()} == {"finish"}

    # Only the rerun's updates are in the model: a and b uploaded in the failed attempt too,
    # and that partial sum was dropped.
    expected = weighted_average([people["a"], people["b"], people["quitter"]])
    for array in final_model(federation).values():
        np.testing.assert_allclose(array, expected, rtol=1e-6)
    # The failure happened in the coordinator, with no aggregator notice: it is counted too.
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'rondo_coordinator_rounds_closed_total{outcome="failed"} 1' in metrics, metrics
