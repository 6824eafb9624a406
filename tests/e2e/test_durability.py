"""Nothing lost when a process dies: the coordinator and the aggregator keep their state in a
real redis-server (and the aggregator its update files under store.data_dir), so that either,
killed with SIGKILL at any moment, carries on where it was when started again. Every scenario
ends with the global model equal to the exact weighted average of the updates acknowledged,
each counted once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_faults import model_value
from test_rounds import Adder, run_in_thread


def durable(redis_server, data_dir: Path | None = None) -> dict[str, object]:
    settings: dict[str, object] = {"store.url": redis_server.url, "store.namespace": "t"}
    if data_dir is not None:
        settings["store.data_dir"] = data_dir
    return settings


def aggregated_rounds(status: dict) -> list[int]:
    return [e["round"] for e in status["history"] if e["outcome"] == "aggregated"]


COORDINATOR = {
    "federation.rounds": 5,
    "federation.min_clients": 2,
    "federation.heartbeat_timeout_secs": 3,
    "federation.heartbeat_period_secs": 0.2,
}


def test_a_coordinator_killed_mid_round_resumes_the_same_round(
    start_federation, redis_server, tmp_path
):
    """SIGKILL mid-round: the restarted coordinator reads the federation back from Redis, the
    same round finishes, nobody joins again, and every round is aggregated exactly once."""
    settings = {**COORDINATOR, **durable(redis_server, tmp_path / "coordinator")}
    federation = start_federation(coordinator=settings)
    people = {"a": Adder(1.0, 10, train_secs=0.4), "b": Adder(3.0, 30, train_secs=0.4)}
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]

    before = federation.wait_for(
        lambda s: len(aggregated_rounds(s)) >= 3 and s["phase"] == "training",
        what="round 3 to be training",
    )
    assert any(k.endswith(":coordinator:federation") for k in redis_server.keys()), (
        redis_server.keys()
    )
    federation.restart_coordinator(tmp_path, settings)
    resumed = federation.status()
    assert resumed["round"] == before["round"], "the same round goes on"
    assert len(resumed["participants"]) == 2, "the participants are still known"
    after = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    for thread in threads:
        thread.join(timeout=20)

    assert {r.final_action for r in reports.values()} == {"finish"}
    assert all(len(r.participant_ids) == 1 for r in reports.values()), "nobody joined again"
    assert aggregated_rounds(after) == [0, 1, 2, 3, 4, 5], after["history"]
    assert not [e for e in after["history"] if e["outcome"] == "failed"], after["history"]
    # Each round adds (10·1 + 30·3) / 40 = 2.5 to every weight, each counted once.
    np.testing.assert_allclose(model_value(federation), 2.5 * 5, rtol=1e-6)


def test_a_coordinator_whose_store_lost_its_state_refuses_to_start(
    start_federation, redis_server, tmp_path
):
    """Redis and the coordinator lost together: the marker in store.data_dir says a federation
    ran, Redis has nothing, and the coordinator says so instead of starting over."""
    data_dir = tmp_path / "coordinator"
    settings = {**COORDINATOR, **durable(redis_server, data_dir)}
    federation = start_federation(coordinator=settings)
    federation.wait_for(lambda s: s["phase"] != "waiting_for_aggregator", what="attach")
    federation.coordinator.process.kill()
    federation.coordinator.process.wait()
    redis_server.restart()
    try:
        federation.restart_coordinator(tmp_path, settings)
    except RuntimeError as exited:
        message = str(exited)
    else:
        raise AssertionError("the coordinator started over on an empty store")
    assert "holds no federation" in message and "coordinator.marker.json" in message, message
    marker = json.loads((data_dir / "coordinator.marker.json").read_text())
    assert marker["namespace"] == "t"
