"""Whole federations: real binaries, real SDK participants, several rounds."""

from __future__ import annotations

import threading
import time

import numpy as np
import requests

import rondo
from rondo.safetensors_io import decode

N_ELEMENTS = 1000


class Adder(rondo.Participant):
    """Adds `delta` to every weight; trains on `n` samples. Optionally dies in `die_in_round`,
    and takes `train_secs` to train (so that a test can act while rounds are running)."""

    def __init__(
        self, delta: float, n: int, die_in_round: int | None = None, train_secs: float = 0.0
    ) -> None:
        self.delta = delta
        self.n = n
        self.die_in_round = die_in_round
        self.train_secs = train_secs
        self.stop = threading.Event()

    def initial_weights(self) -> rondo.Weights:
        return {
            "layer/w": np.zeros((N_ELEMENTS // 10, 10), np.float32),
            "layer/b": np.zeros(10, np.float32),
        }

    def train_round(self, weights: rondo.Weights, round: int):
        if round == self.die_in_round:
            # Stop heartbeating and never upload: a crash in the middle of training.
            self.stop.set()
        time.sleep(self.train_secs)
        return {k: v + np.float32(self.delta) for k, v in weights.items()}, self.n, {"loss": 0.5}


def run_in_thread(participant: Adder, url: str, name: str, reports: dict) -> threading.Thread:
    def target() -> None:
        reports[name] = rondo.run_participant(
            participant, url, heartbeat_period=0.2, name=name, stop_event=participant.stop
        )

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def expected_value(status: dict, by_name: dict[str, Adder]) -> float:
    """Replays FedAvg from the status history: the value every weight should hold."""
    name_of = {p["participant_id"]: p["name"] for p in status["participants"]}
    value = 0.0
    for entry in status["history"]:
        if entry["outcome"] != "aggregated" or entry["round"] == 0:
            continue
        delivered = [by_name[name_of[pid]] for pid in entry["delivered"]]
        total = sum(p.n for p in delivered)
        value = sum(p.n * (value + p.delta) for p in delivered) / total
    return value


def final_model(federation) -> rondo.Weights:
    response = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    response.raise_for_status()
    weights, metadata = decode(response.content)
    return weights


def test_rounds_late_joiner_and_dropout(start_federation):
    federation = start_federation(
        coordinator={
            "federation.rounds": 4,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 1.5,
            "federation.heartbeat_period_secs": 0.2,
        }
    )
    url = federation.coordinator_url
    people = {
        "a": Adder(1.0, 10),
        "b": Adder(2.0, 30),
        "quitter": Adder(100.0, 50, die_in_round=2),
    }
    reports: dict = {}
    threads = [run_in_thread(p, url, name, reports) for name, p in people.items()]

    # The late joiner arrives once round 1 has closed.
    federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] for e in s["history"]),
        what="round 1 to close",
    )
    people["late"] = Adder(4.0, 20)
    threads.append(run_in_thread(people["late"], url, "late", reports))

    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    for thread in threads:
        thread.join(timeout=10)

    history = {(e["round"], e["attempt"]): e for e in status["history"]}
    ids = {p["name"]: p["participant_id"] for p in status["participants"]}
    assert [e["outcome"] for e in status["history"]] == ["aggregated"] * 5  # rounds 0..4

    # Round 2: the quitter was selected, stopped heartbeating, and the round still closed.
    round2 = history[(2, 0)]
    assert ids["quitter"] in round2["selected"]
    assert round2["dropped"] == [ids["quitter"]]
    assert ids["quitter"] not in round2["delivered"]
    assert "dropped" in round2["reason"], round2["reason"]
    assert next(p for p in status["participants"] if p["name"] == "quitter")["state"] == "dropped"
    assert reports["quitter"].final_action == "stopped"

    # The late joiner was not in round 1 and took part in later rounds.
    assert ids["late"] not in history[(1, 0)]["selected"]
    assert all(ids["late"] in history[(r, 0)]["delivered"] for r in (3, 4))
    assert reports["late"].final_action == "finish"

    # The global model is the FedAvg of exactly the delivered updates, round after round.
    expected = expected_value(status, people)
    model = final_model(federation)
    assert set(model) == {"layer/w", "layer/b"}
    for array in model.values():
        np.testing.assert_allclose(array, expected, rtol=1e-6)


def test_waits_for_a_coordinator_that_starts_later(start_federation, tmp_path):
    """Participants started before the services keep trying and then run normally."""
    reports: dict = {}
    port_holder = {}

    def late_start() -> None:
        time.sleep(1.0)
        port_holder["federation"] = start_federation(
            coordinator={"federation.rounds": 2, "api.port": port_holder["port"]}
        )

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port_holder["port"] = s.getsockname()[1]
    url = f"http://127.0.0.1:{port_holder['port']}"
    people = {"x": Adder(1.0, 1), "y": Adder(3.0, 1)}
    threads = [run_in_thread(p, url, name, reports) for name, p in people.items()]
    starter = threading.Thread(target=late_start)
    starter.start()
    starter.join()
    for thread in threads:
        thread.join(timeout=60)
    assert {r.final_action for r in reports.values()} == {"finish"}
    federation = port_holder["federation"]
    status = federation.status()
    np.testing.assert_allclose(final_model(federation)["layer/b"], expected_value(status, people))
