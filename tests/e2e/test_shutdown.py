"""Shutdown loses no work: on SIGTERM a service stops accepting, finishes what it owes the
other service within a bound, and exits 0."""

from __future__ import annotations

import os
import signal
import time

import requests
from safetensors.numpy import save_file
from test_bad_input import Person, upload_bytes, weights


def test_a_notice_queued_at_sigterm_is_delivered(start_federation, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 300,
        },
        aggregator={"model.initial_model": initial},
    )
    a = Person(federation.coordinator_url, "a")
    b = Person(federation.coordinator_url, "b")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    ticket = b.post("start_training").json()
    assert a.post("start_training").status_code == 200

    # The coordinator cannot answer for now: the aggregator's notice that it accepted b's
    # update waits in its outbox.
    coordinator = federation.coordinator.process
    os.kill(coordinator.pid, signal.SIGSTOP)
    try:
        answer = requests.post(
            ticket["upload_url"],
            data=upload_bytes(weights(2.0), n_samples="3"),
            headers={"Authorization": f"Bearer {ticket['token']}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        federation.aggregator.process.terminate()
        time.sleep(0.5)
        assert federation.aggregator.process.poll() is None, "exited with a notice undelivered"
    finally:
        os.kill(coordinator.pid, signal.SIGCONT)
    assert federation.aggregator.process.wait(timeout=20) == 0

    status = federation.status()
    record = next(e for e in status["history"] if e["round"] == 1)
    assert record["delivered"] == [b.id], record
    assert record["deliveries"][0]["n_samples"] == 3


def test_services_exit_promptly_on_sigterm_while_a_round_runs(start_federation, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    federation = start_federation(
        coordinator={"federation.rounds": 2, "federation.min_clients": 1},
        aggregator={"model.initial_model": initial},
    )
    Person(federation.coordinator_url, "a")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    for service in (federation.coordinator, federation.aggregator):
        started = time.monotonic()
        service.process.terminate()
        assert service.process.wait(timeout=20) == 0, service.name
        assert time.monotonic() - started < 15, service.name
