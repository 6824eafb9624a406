"""Both services' /metrics during a real federation, read with Prometheus' own text-format
parser (prometheus_client): counters and histograms move as rounds run and agree with what
happened; every metric exposed is documented in docs/metrics.md and every documented one is
exposed; names follow Prometheus' conventions; the Grafana dashboard queries only documented
metrics."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families
from test_rounds import Adder, run_in_thread

import rondo
from rondo.safetensors_io import encode

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "rondo.json"
ROUNDS = 3
MIB = 1 << 20


class Scraped:
    """One scrape: every sample by (name, labels), and the metric names with their types."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            # The parser strips `_total` off counter family names; the exposed name has it.
            name = family.name + "_total" if family.type == "counter" else family.name
            self.types[name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, metric: str, **labels: str) -> float:
        return self.samples.get((metric, frozenset(labels.items())), 0.0)

    def total(self, metric: str) -> float:
        """Sum over every label set."""
        return sum(v for (n, _), v in self.samples.items() if n == metric)


def scrape(url: str) -> Scraped:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scraped(response.text)


def documented() -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), re.MULTILINE))


class Evaluator(Adder):
    def evaluate(self, weights: rondo.Weights, round: int):
        return 1.0 / (round + 1), self.n, {"accuracy": 0.5}


def test_metrics_move_as_rounds_run_and_agree_with_the_federation(start_federation):
    federation = start_federation(
        coordinator={
            "federation.rounds": ROUNDS,
            "federation.min_clients": 3,
            "federation.evaluate_every": 1,
        }
    )
    c, a = federation.coordinator_url, federation.aggregator_url
    before = {"coordinator": scrape(c), "aggregator": scrape(a)}
    assert before["coordinator"].value("rondo_coordinator_joins_total") == 0
    assert before["coordinator"].value("rondo_coordinator_phase", phase="waiting_for_participants")

    # Refusals, one of each kind counted below.
    assert requests.get(f"{c}/v1/no-such-route", timeout=5).status_code == 404
    wrong = requests.post(
        f"{c}/v1/participants/no-such-id/heartbeat",
        headers={"Authorization": "Bearer x"},
        timeout=5,
    )
    assert wrong.json()["error"]["code"] == "unknown_participant"

    gate = threading.Event()  # holds round 2's training until the mid-federation scrape is done

    class Gated(Evaluator):
        def train_round(self, weights, round):
            if round == 2:
                gate.wait(30)
            return super().train_round(weights, round)

    people = {"a": Gated(1.0, 10), "b": Gated(2.0, 20), "c": Gated(3.0, 30)}
    reports: dict = {}
    threads = [run_in_thread(p, c, name, reports) for name, p in people.items()]
    try:
        federation.wait_for(lambda s: s["round"] == 2 and s["phase"] == "training", what="round 2")
        bad = encode({"layer/w": np.zeros((100, 10), np.float32)}, {"rondo.n_samples": "1"})
        refused = requests.post(
            f"{a}/v1/rounds/2/update",
            data=bad,
            headers={"Authorization": "Bearer " + "0" * 64},
            timeout=5,
        )
        assert refused.json()["error"]["code"] == "invalid_token"
        middle = {"coordinator": scrape(c), "aggregator": scrape(a)}
    finally:
        gate.set()
    for thread in threads:
        thread.join(timeout=60)
    assert {r.final_action for r in reports.values()} == {"finish"}, reports
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="the end")
    after = {"coordinator": scrape(c), "aggregator": scrape(a)}

    # --- the coordinator ---
    cm, ca = middle["coordinator"], after["coordinator"]
    assert ca.value("rondo_coordinator_joins_total") == 3
    assert cm.value("rondo_coordinator_round") == 2
    assert ca.value("rondo_coordinator_round") == ROUNDS
    assert ca.value("rondo_coordinator_federation_rounds") == ROUNDS
    assert ca.value("rondo_coordinator_phase", phase="finished") == 1
    assert cm.value("rondo_coordinator_phase", phase="training") == 1
    assert ca.total("rondo_coordinator_phase") == 1
    assert ca.value("rondo_coordinator_participants", state="available") == 3
    assert ca.value("rondo_coordinator_aggregator_up") == 1
    closed = [r for r in status["history"] if r["outcome"] == "aggregated"]
    assert len(closed) == ROUNDS + 1  # round 0 too
    aggregated = ca.value("rondo_coordinator_rounds_closed_total", outcome="aggregated")
    assert cm.value("rondo_coordinator_rounds_closed_total", outcome="aggregated") == 2
    assert aggregated == len(closed)
    count = "rondo_coordinator_round_duration_seconds_count"
    assert cm.value(count, outcome="aggregated") == 2
    assert ca.value(count, outcome="aggregated") == len(closed)
    total_secs = sum(r["duration_secs"] for r in closed)
    measured = ca.value("rondo_coordinator_round_duration_seconds_sum", outcome="aggregated")
    assert abs(measured - total_secs) < 1e-6
    training = "rondo_coordinator_phase_duration_seconds_count"
    assert ca.value(training, phase="training") > cm.value(training, phase="training") >= 2
    assert ca.value("rondo_coordinator_heartbeats_total", action="train") > cm.value(
        "rondo_coordinator_heartbeats_total", action="train"
    )
    assert ca.value("rondo_coordinator_heartbeats_total", action="finish") >= 3
    refused_c = "rondo_coordinator_requests_refused_total"
    assert ca.value(refused_c, code="unknown_route") == 1
    assert ca.value(refused_c, code="unknown_participant") == 1
    assert ca.value("rondo_coordinator_evaluation_reports_total") > cm.value(
        "rondo_coordinator_evaluation_reports_total"
    )
    assert ca.value("rondo_coordinator_evaluation_metric", name="accuracy") == 0.5

    # --- the aggregator ---
    am, aa = middle["aggregator"], after["aggregator"]
    accepted = sum(len(r["delivered"]) for r in closed)
    assert aa.value("rondo_aggregator_updates_accepted_total") == accepted
    assert am.value("rondo_aggregator_updates_accepted_total") < accepted
    assert aa.value("rondo_aggregator_upload_duration_seconds_count", outcome="accepted") == (
        accepted
    )
    assert aa.value("rondo_aggregator_upload_duration_seconds_count", outcome="refused") == 1
    assert aa.value("rondo_aggregator_updates_rejected_total", code="invalid_token") == 1
    assert aa.value("rondo_aggregator_requests_refused_total", code="invalid_token") == 1
    uploaded = aa.value("rondo_aggregator_upload_bytes_total")
    assert (
        uploaded
        == aa.value("rondo_aggregator_folded_bytes_total")
        > am.value("rondo_aggregator_folded_bytes_total")
    )
    assert aa.value("rondo_aggregator_fold_duration_seconds_count") == accepted
    for histogram in ("close", "finalize"):
        name = f"rondo_aggregator_{histogram}_duration_seconds_count"
        assert am.value(name) == 2 and aa.value(name) == len(closed), histogram
    assert aa.value("rondo_aggregator_rounds_closed_total", outcome="aggregated") == len(closed)
    model = requests.get(f"{a}/v1/model", timeout=5)
    assert aa.value("rondo_aggregator_model_size_bytes") == len(model.content)
    assert aa.value("rondo_aggregator_model_round") == ROUNDS
    assert before["aggregator"].value("rondo_aggregator_model_round") == -1
    # Every download is the same size (the same tensors, a one-digit round in the header), and
    # this test's own download above is counted once it has ended.
    downloads = aa.value("rondo_aggregator_download_duration_seconds_count")
    assert downloads >= ROUNDS * 3
    after_own = scrape(a)
    assert after_own.value("rondo_aggregator_download_duration_seconds_count") == downloads + 1
    assert after_own.value("rondo_aggregator_download_bytes_total") == (downloads + 1) * len(
        model.content
    )
    assert after_own.value("rondo_aggregator_downloads_aborted_total") == 0
    assert aa.value("rondo_aggregator_staging_budget_bytes") == 32 * MIB
    reserved = aa.value("rondo_aggregator_staging_reserved_bytes")
    assert reserved >= aa.value("rondo_aggregator_staging_idle_bytes")
    assert reserved <= 32 * MIB

    # --- both ---
    for service, scraped in after.items():
        assert scraped.value(f"rondo_{service}_build_info", version="0.1.0") == 1
        assert scraped.value("process_resident_memory_bytes") > 1 * MIB
        assert scraped.value("process_open_fds") > 3
        assert scraped.value("process_threads") >= 1

    # --- names: documented, both ways, and conventional ---
    exposed = set(after["coordinator"].types) | set(after["aggregator"].types)
    docs = documented()
    assert exposed - docs == set(), f"exposed but not in docs/metrics.md: {exposed - docs}"
    assert docs - exposed == set(), f"in docs/metrics.md but never exposed: {docs - exposed}"
    for name, kind in {**after["coordinator"].types, **after["aggregator"].types}.items():
        assert (kind == "counter") == name.endswith("_total"), f"{name} ({kind})"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: a histogram of durations, in seconds"
        assert not re.search(r"_(ms|millis|milliseconds|kb|mb|mib)(_|$)", name), name


def test_an_aborted_download_is_counted_as_such(start_federation, tmp_path):
    """A client that hangs up mid-download is counted as aborted, not as a download."""
    import socket

    from safetensors.numpy import save_file

    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(4 * MIB, np.float32)}, str(initial))  # 16 MiB: many slices
    federation = start_federation(aggregator={"model.initial_model": initial})
    a = federation.aggregator_url
    host, port = federation.aggregator.addresses["api"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    # The hang-up is seen once hyper next writes; wait for the count.
    for _ in range(100):
        scraped = scrape(a)
        if scraped.value("rondo_aggregator_downloads_aborted_total") == 1:
            break
        threading.Event().wait(0.05)
    assert scraped.value("rondo_aggregator_downloads_aborted_total") == 1
    assert scraped.value("rondo_aggregator_download_duration_seconds_count") == 0
    assert 0 < scraped.value("rondo_aggregator_download_bytes_total") < 16 * MIB


def test_the_dashboard_queries_only_documented_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    docs = documented()
    used = set()
    for expr in exprs:
        for name in re.findall(r"\b((?:rondo|process)_[a-z_]+)", expr):
            used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used - docs == set(), f"the dashboard queries undocumented metrics: {used - docs}"
    assert len(used) >= 25
