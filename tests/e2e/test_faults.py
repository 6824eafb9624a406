"""Faults: a coordinator killed mid-federation, and (with RONDO_LONG_TESTS=1) a long run with
many participants and dropouts. Real binaries, real SDK participants."""

from __future__ import annotations

import os

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file
from test_rounds import Adder, expected_value, final_model, run_in_thread

import rondo
from rondo.safetensors_io import decode


def model_value(federation) -> float:
    """The single value every weight of the current global model holds."""
    response = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    weights, _ = decode(response.content)
    values = np.concatenate([w.ravel() for w in weights.values()])
    assert values.min() == values.max()
    return float(values[0])


def test_coordinator_killed_mid_federation(start_federation, tmp_path):
    """The aggregator keeps the global model; a new coordinator attaches, learns the model's
    round from it and carries on; participants that the new coordinator does not know join
    again by themselves. No accepted update is lost: the final model is the FedAvg replay of
    every round, across the restart."""
    settings = {
        "federation.rounds": 5,
        "federation.min_clients": 2,
        "federation.heartbeat_timeout_secs": 2,
        "federation.heartbeat_period_secs": 0.2,
    }
    federation = start_federation(coordinator=settings)
    # Rounds of a fraction of a second, so that the restart lands in the middle.
    people = {"a": Adder(1.0, 10, train_secs=0.2), "b": Adder(3.0, 30, train_secs=0.2)}
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]

    before = federation.wait_for(
        lambda s: sum(e["outcome"] == "aggregated" for e in s["history"]) >= 3,
        what="round 2 to close",
    )
    federation.restart_coordinator(tmp_path, settings)
    # The new coordinator's history starts where the aggregator's model was.
    after = federation.wait_for(
        lambda s: s["phase"] == "finished", what="all rounds, after restart"
    )
    for thread in threads:
        thread.join(timeout=20)

    assert {r.final_action for r in reports.values()} == {"finish"}
    # Both participants had to join again under new ids.
    assert all(len(r.participant_ids) == 2 for r in reports.values())
    rounds_before = [e["round"] for e in before["history"] if e["outcome"] == "aggregated"]
    rounds_after = [e["round"] for e in after["history"] if e["outcome"] == "aggregated"]
    assert rounds_after, "the new coordinator ran rounds"
    assert min(rounds_after) > 0, "the new coordinator did not redo round 0"
    assert max(rounds_after) == 5
    # Every round 1..5 was aggregated exactly once across the two coordinators: none twice, and
    # none missing except the round open at the kill, which the aggregator may have closed too
    # late for the old coordinator to record (the new one then resumed right after it).
    assert not set(rounds_before) & set(rounds_after), (rounds_before, rounds_after)
    missing = set(range(1, 6)) - set(rounds_before) - set(rounds_after)
    assert missing <= {min(rounds_after) - 1}, (missing, rounds_before, rounds_after)

    # Replay FedAvg: the same value for every weight, from the history of both coordinators.
    # Each round adds the n-weighted mean delta of the participants that delivered (a: +1 with
    # n=10, b: +3 with n=30) - both deliver every round here, so each round adds 2.5.
    np.testing.assert_allclose(model_value(federation), 2.5 * 5, rtol=1e-6)


def test_aggregator_killed_mid_federation(start_federation, tmp_path):
    """A restarted aggregator has only its configured initial model: the coordinator notices
    (its probe fails, it reconnects), closes the round in progress as failed, and runs the lost
    rounds again. The final model is exactly what rounds 1..4 give from the initial model."""
    initial = tmp_path / "initial.safetensors"
    save_file({"layer/w": np.zeros((100, 10), np.float32), "layer/b": np.zeros(10, np.float32)},
              str(initial))  # fmt: skip
    aggregator = {"model.initial_model": initial}
    federation = start_federation(
        coordinator={
            "federation.rounds": 4,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 5,
            "federation.heartbeat_period_secs": 0.2,
            "aggregator.call_timeout_secs": 1,
        },
        aggregator=aggregator,
    )
    # Rounds of a fraction of a second, so that the restart lands in the middle.
    people = {"a": Adder(1.0, 10, train_secs=0.2), "b": Adder(3.0, 30, train_secs=0.2)}
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    federation.wait_for(
        lambda s: sum(e["outcome"] == "aggregated" for e in s["history"]) >= 2,
        what="round 2 to close",
    )
    federation.restart_aggregator(tmp_path, aggregator)
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds again")
    for thread in threads:
        thread.join(timeout=20)

    assert {r.final_action for r in reports.values()} == {"finish"}
    rewound = [e for e in status["history"] if "restarted" in (e["reason"] or "")]
    assert rewound and all(e["outcome"] == "failed" for e in rewound), status["history"]
    # Rounds 1..4 counted from the restart: each adds (10·1 + 30·3) / 40 = 2.5 to every weight.
    np.testing.assert_allclose(model_value(federation), 4 * 2.5, rtol=1e-6)


@pytest.mark.skipif(not os.environ.get("RONDO_LONG_TESTS"), reason="set RONDO_LONG_TESTS=1")
def test_many_participants_with_dropouts(start_federation):
    """50 participants, 6 rounds of a 4 MB model; a fifth of them die in the middle of some
    round. Every round closes, and the final model is the exact FedAvg replay."""
    federation = start_federation(
        coordinator={
            "federation.rounds": 6,
            "federation.min_clients": 10,
            "federation.participants_ratio": 0.5,
            "federation.heartbeat_timeout_secs": 3,
            "federation.heartbeat_period_secs": 0.5,
        }
    )

    class Big(Adder):
        def initial_weights(self) -> rondo.Weights:
            return {"w": np.zeros(1_000_000, np.float32)}

    people = {
        f"p{i}": Big(float(i % 7), 1 + i, die_in_round=(2 + i % 4) if i % 5 == 0 else None)
        for i in range(50)
    }
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    status = federation.wait_for(lambda s: s["phase"] == "finished", timeout=300, what="6 rounds")
    for thread in threads:
        thread.join(timeout=30)
    assert all(e["outcome"] == "aggregated" for e in status["history"])
    assert sum(len(e["dropped"]) for e in status["history"]) > 0
    expected = expected_value(status, people)
    np.testing.assert_allclose(final_model(federation)["w"], expected, rtol=1e-5)
    assert not [t for t in threads if t.is_alive()]
