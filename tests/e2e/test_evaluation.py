"""Federated evaluation through the real services: participants score each global model on
their own data; the history, the status, the history download and /metrics carry the
sample-weighted mean of exactly what they reported."""

from __future__ import annotations

import csv
import io

import numpy as np
import requests
from test_openapi import check_response, document
from test_rounds import Adder, run_in_thread

import rondo


class Scorer(Adder):
    """An Adder that can evaluate: its "loss" on a model is the model's mean value plus its own
    offset, on `n` samples; every report is recorded."""

    def __init__(self, delta: float, n: int, offset: float, reports: list) -> None:
        super().__init__(delta, n)
        self.offset = offset
        self.reported = reports

    def evaluate(self, weights: rondo.Weights, round: int):
        mean = float(np.mean(weights["layer/w"]))
        loss = mean + self.offset
        self.reported.append((round, loss, self.n, mean))
        return loss, self.n, {"mean": mean, "offset": self.offset}


def test_every_model_is_scored_and_the_mean_is_sample_weighted(start_federation):
    federation = start_federation(
        coordinator={
            "federation.rounds": 2,
            "federation.min_clients": 3,
            "federation.evaluate_every": 1,
            "federation.evaluate_fraction": 1.0,
        }
    )
    reports: list = []
    people = {
        "a": Scorer(1.0, 10, 0.0, reports),
        "b": Scorer(2.0, 30, 1.0, reports),
        # Cannot evaluate: never asked, and the federation still finishes.
        "mute": Adder(3.0, 20),
    }
    results: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, results) for n, p in people.items()]
    for thread in threads:
        thread.join(timeout=60)
    assert all(results[n].final_action == "finish" for n in people), results
    assert sorted(results["a"].evaluated) == [0, 1, 2]
    assert results["mute"].evaluated == []

    doc = document("coordinator")
    answer = requests.get(f"{federation.coordinator_url}/v1/status", timeout=5)
    check_response(doc, "/v1/status", "get", answer)
    status = answer.json()
    by_round = {}
    for round_, loss, n, _ in reports:
        by_round.setdefault(round_, []).append((loss, n))
    assert sorted(by_round) == [0, 1, 2], "the initial, the middle and the final model"
    aggregated = {e["round"]: e for e in status["history"] if e["outcome"] == "aggregated"}
    for round_, pairs in by_round.items():
        evaluation = aggregated[round_]["evaluation"]
        weight = sum(n for _, n in pairs)
        assert evaluation["participants"] == len(pairs) == 2
        assert evaluation["n_samples"] == weight == 40
        expected = sum(loss * n for loss, n in pairs) / weight
        assert abs(evaluation["loss"] - expected) < 1e-9, (round_, evaluation, pairs)
        assert abs(evaluation["metrics"]["offset"] - 30 / 40) < 1e-12
    assert any(p["can_evaluate"] for p in status["participants"])

    # The whole history, as JSON and as CSV.
    answer = requests.get(f"{federation.coordinator_url}/v1/history", timeout=5)
    check_response(doc, "/v1/history", "get", answer)
    rounds = answer.json()["rounds"]
    assert [(r["round"], r["outcome"]) for r in rounds] == [
        (0, "aggregated"),
        (1, "aggregated"),
        (2, "aggregated"),
    ]
    assert rounds[2]["evaluation"] == aggregated[2]["evaluation"]
    assert rounds[1]["training_metrics"] == {"loss": 0.5}
    text = requests.get(f"{federation.coordinator_url}/v1/history.csv", timeout=5)
    check_response(doc, "/v1/history.csv", "get", text)
    rows = list(csv.DictReader(io.StringIO(text.text)))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert abs(float(rows[2]["eval_loss"]) - aggregated[2]["evaluation"]["loss"]) < 1e-9
    assert "eval_mean" in rows[0] and "train_loss" in rows[0]

    metrics = requests.get(f"{federation.coordinator_url}/metrics", timeout=5).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("rondo_coordinator_evaluation")
    }
    assert values["rondo_coordinator_evaluation_round"] == 2
    final_loss = aggregated[2]["evaluation"]["loss"]
    assert abs(values["rondo_coordinator_evaluation_loss"] - final_loss) < 1e-9
    assert values["rondo_coordinator_evaluation_reports_total"] == 6


def test_a_report_nobody_asked_for_is_refused(start_federation):
    federation = start_federation(coordinator={"federation.evaluate_every": 1})
    joined = requests.post(
        f"{federation.coordinator_url}/v1/participants", json={"can_evaluate": True}, timeout=5
    ).json()
    url = f"{federation.coordinator_url}/v1/participants/{joined['participant_id']}/evaluation"
    auth = {"Authorization": f"Bearer {joined['secret']}"}
    doc = document("coordinator")
    path = "/v1/participants/{id}/evaluation"
    answer = requests.post(url, json={"round": 0, "loss": 1.0, "n_samples": 3}, headers=auth)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "not_asked"
    check_response(doc, path, "post", answer)
    answer = requests.post(url, json={"round": 0, "loss": "x", "n_samples": 3}, headers=auth)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_body"
    check_response(doc, path, "post", answer)
    answer = requests.post(url, json={"round": 0, "loss": 1.0, "n_samples": 3})
    assert answer.status_code == 401
    check_response(doc, path, "post", answer)
    assert requests.get(f"{federation.coordinator_url}/v1/history", timeout=5).json() == {
        "rounds": []
    }


def test_the_final_model_is_written_where_the_user_said(start_federation, tmp_path):
    path = tmp_path / "out" / "final.safetensors"
    path.parent.mkdir()
    federation = start_federation(
        coordinator={"federation.rounds": 3, "federation.min_clients": 2},
        aggregator={"model.output_path": path},
    )
    results: dict = {}
    threads = [
        run_in_thread(Adder(d, 10), federation.coordinator_url, f"p{d}", results) for d in (1, 2)
    ]
    for thread in threads:
        thread.join(timeout=60)
    assert all(r.final_action == "finish" for r in results.values()), results
    final = requests.get(f"{federation.aggregator_url}/v1/model", timeout=5)
    assert final.headers["x-rondo-round"] == "3"
    federation.aggregator.stop()  # SIGTERM waits for a write in progress
    assert path.read_bytes() == final.content
    tensors, metadata = rondo.safetensors_io.decode(
        np.frombuffer(path.read_bytes(), np.uint8).copy()
    )
    assert metadata["rondo.round"] == "3"
    assert all(np.all(t == 4.5) for t in tensors.values()), "three rounds of +1.5"
    assert not path.with_name("final.safetensors.tmp").exists()
