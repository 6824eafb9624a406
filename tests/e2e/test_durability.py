"""Nothing lost when a process dies: the coordinator and the aggregator keep their state in a
real redis-server (and the aggregator its update files under store.data_dir), so that either,
killed with SIGKILL at any moment, carries on where it was when started again. Every scenario
ends with the global model equal to the exact weighted average of the updates acknowledged,
each counted once."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from conftest import ROOT, TcpProxy, free_port, kill_both_and_restart
from safetensors.numpy import save_file
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


def metric(federation, prefix: str) -> float:
    text = requests.get(f"{federation.aggregator_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def accepted_uploads(federation) -> float:
    """Uploads this aggregator process answered 2xx (folded back ones not included)."""
    return metric(federation, 'rondo_aggregator_upload_duration_seconds_count{outcome="accepted"}')


def test_an_aggregator_killed_mid_round_keeps_what_it_acknowledged(
    start_federation, redis_server, tcp_proxy, tmp_path
):
    """Two updates acknowledged, a third cut off mid-body, then SIGKILL: the restarted
    aggregator folds the two back in from store.data_dir (nobody uploads them again), the SDK
    sends the cut one again with the same token, and the round's model is the exact weighted
    average of the three, each counted once."""
    initial = tmp_path / "initial.safetensors"
    save_file({"layer/w": np.zeros((100, 10), np.float32), "layer/b": np.zeros(10, np.float32)},
              str(initial))  # fmt: skip
    aggregator = {
        "model.initial_model": initial,
        "api.public_url": tcp_proxy.url,
        **durable(redis_server, tmp_path / "aggregator"),
    }
    coordinator = {
        **COORDINATOR,
        "federation.rounds": 1,
        "federation.min_clients": 3,
        "federation.heartbeat_timeout_secs": 10,
        "aggregator.call_timeout_secs": 1,
        **durable(redis_server),
    }
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    tcp_proxy.target = ("127.0.0.1", int(federation.aggregator.addresses["api"].rsplit(":")[1]))
    people = {
        "a": Adder(1.0, 10),
        "b": Adder(3.0, 30),
        # Trains long enough for the test to set the proxy to cut its upload.
        "c": Adder(2.0, 20, train_secs=2.0),
    }
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]

    deadline = time.monotonic() + 30
    while len(federation.aggregator_status()["accepted"]) < 2:
        assert time.monotonic() < deadline, federation.aggregator_status()
        time.sleep(0.02)
    tcp_proxy.stall_after(1000)
    assert tcp_proxy.stalled.wait(timeout=30), "c's upload never started"
    assert len(federation.aggregator_status()["accepted"]) == 2
    federation.aggregator.process.kill()
    federation.aggregator.process.wait()
    tcp_proxy.stall_after(None)
    federation.restart_aggregator(tmp_path, aggregator)
    restored = federation.aggregator_status()
    assert len(restored["accepted"]) == 2, restored

    status = federation.wait_for(lambda s: s["phase"] == "finished", what="the round to close")
    for thread in threads:
        thread.join(timeout=20)
    assert accepted_uploads(federation) == 1, "only the cut upload was sent again"
    rounds = [e for e in status["history"] if e["outcome"] == "aggregated"]
    assert [e["round"] for e in rounds] == [1], status["history"]
    assert len(rounds[0]["delivered"]) == 3
    np.testing.assert_allclose(model_value(federation), (10 * 1 + 30 * 3 + 20 * 2) / 60, rtol=1e-6)
    # The round is over: its saved updates are gone from the disk and from Redis.
    assert not any((tmp_path / "aggregator" / "updates").iterdir())
    assert not [k for k in redis_server.keys() if ":aggregator:accepted:" in k]


def test_a_retried_upload_that_got_in_is_answered_not_counted(
    start_federation, redis_server, tmp_path
):
    """With saved updates the aggregator knows each accepted update's SHA-256: a retry with the
    same bytes gets a 2xx that says it was in already, other bytes a 409; neither counts."""
    from test_bad_input import Person, upload_bytes, weights

    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 120,
            **durable(redis_server),
        },
        aggregator={"model.initial_model": initial, **durable(redis_server, tmp_path / "agg")},
    )
    a = Person(federation.coordinator_url, "a")
    Person(federation.coordinator_url, "b")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    ticket = a.post("start_training").json()

    def upload(value: float, n: str = "5") -> requests.Response:
        return requests.post(
            ticket["upload_url"],
            data=upload_bytes(weights(value), n),
            headers={"Authorization": f"Bearer {ticket['token']}"},
            timeout=10,
        )

    first = upload(1.0)
    assert first.status_code == 200 and "already_accepted" not in first.json(), first.text
    again = upload(1.0)
    assert again.status_code == 200, again.text
    assert again.json()["already_accepted"] is True
    other = upload(2.0)
    assert other.status_code == 409 and other.json()["error"]["code"] == "duplicate_update"
    more_samples = upload(1.0, "6")
    assert more_samples.status_code == 409, more_samples.text
    assert federation.aggregator_status()["accepted"] == [a.id]
    assert metric(federation, "rondo_aggregator_updates_accepted_total") == 1


def three_people(c_secs: float = 2.0) -> dict[str, Adder]:
    """a and b deliver at once; c trains long enough for the test to act mid-round."""
    return {"a": Adder(1.0, 10), "b": Adder(3.0, 30), "c": Adder(2.0, 20, train_secs=c_secs)}


THREE_PEOPLE_MEAN = (10 * 1 + 30 * 3 + 20 * 2) / 60


def one_round(redis_server, tmp_path: Path) -> tuple[dict, dict]:
    initial = tmp_path / "initial.safetensors"
    if not initial.exists():
        save_file({"layer/w": np.zeros((100, 10), np.float32), "layer/b": np.zeros(10, np.float32)},
                  str(initial))  # fmt: skip
    coordinator = {
        **COORDINATOR,
        "federation.rounds": 1,
        "federation.min_clients": 3,
        "federation.heartbeat_timeout_secs": 10,
        "aggregator.call_timeout_secs": 1,
        **durable(redis_server, tmp_path / "coordinator"),
    }
    aggregator = {"model.initial_model": initial, **durable(redis_server, tmp_path / "aggregator")}
    return coordinator, aggregator


def wait_for_accepted(federation, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(federation.aggregator_status()["accepted"]) < n:
        assert time.monotonic() < deadline, federation.aggregator_status()
        time.sleep(0.02)


def finish_exactly_once(federation, threads, reports) -> dict:
    """Waits for the federation to finish and checks round 1 was aggregated once, from all
    three, with nobody joining again, and the model is their exact weighted average."""
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="the round to close")
    for thread in threads:
        thread.join(timeout=20)
    assert {r.final_action for r in reports.values()} == {"finish"}, reports
    assert all(len(r.participant_ids) == 1 for r in reports.values()), "nobody joined again"
    rounds = [e for e in status["history"] if e["outcome"] == "aggregated"]
    assert [e["round"] for e in rounds] == [1], status["history"]
    assert len(rounds[0]["delivered"]) == 3, rounds
    np.testing.assert_allclose(model_value(federation), THREE_PEOPLE_MEAN, rtol=1e-6)
    return status


def test_both_killed_at_once_mid_round(start_federation, redis_server, tmp_path):
    """SIGKILL coordinator and aggregator together after two uploads were acknowledged: both
    come back from Redis and the data directory, and the same round finishes with all three."""
    coordinator, aggregator = one_round(redis_server, tmp_path)
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    reports: dict = {}
    people = three_people(c_secs=4.0)
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    wait_for_accepted(federation, 2)
    kill_both_and_restart(federation, tmp_path, coordinator, aggregator)
    assert len(federation.aggregator_status()["accepted"]) >= 2
    finish_exactly_once(federation, threads, reports)


def test_redis_restarted_empty_mid_round(start_federation, redis_server, tmp_path):
    """Redis restarted without persistence mid-round: both services notice within a second and
    write back what they hold; killed after that, both still come back to the same round."""
    coordinator, aggregator = one_round(redis_server, tmp_path)
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    reports: dict = {}
    # c trains until well after Redis is back and written to.
    people = three_people(c_secs=6.0)
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    wait_for_accepted(federation, 2)
    redis_server.restart()
    assert redis_server.keys() == []
    deadline = time.monotonic() + 10
    wanted = {"rondo:t:coordinator:federation", "rondo:t:aggregator:round"}
    while not wanted <= set(redis_server.keys()):
        assert time.monotonic() < deadline, redis_server.keys()
        time.sleep(0.05)
    accepted = redis_server.cli("--raw", "HKEYS", "rondo:t:aggregator:accepted:1:0").split()
    assert len(accepted) == 2, (accepted, federation.aggregator_status())
    kill_both_and_restart(federation, tmp_path, coordinator, aggregator)
    finish_exactly_once(federation, threads, reports)
    logs = "".join(s.log.read_text() for s in federation.services)
    assert "written back" in logs


def test_uploads_acknowledged_while_the_coordinator_is_down_stay_counted(
    start_federation, redis_server, tmp_path
):
    """The coordinator dies right after handing out the round's tokens; the participants
    upload while it is down, and the aggregator acknowledges them. Back up, the coordinator
    hears of them (the aggregator's notices wait for it) and the round closes with all three."""
    coordinator, aggregator = one_round(redis_server, tmp_path)
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    people = {
        "a": Adder(1.0, 10, train_secs=0.5),
        "b": Adder(3.0, 30, train_secs=0.5),
        "c": Adder(2.0, 20, train_secs=0.5),
    }
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    federation.wait_for(
        lambda s: sum(p["state"] == "training" for p in s["participants"]) == 3,
        what="all three to start training",
    )
    federation.coordinator.process.kill()
    federation.coordinator.process.wait()
    wait_for_accepted(federation, 3)
    federation.restart_coordinator(tmp_path, coordinator)
    finish_exactly_once(federation, threads, reports)


def test_a_partition_between_the_services_longer_than_the_call_deadline(start_federation, tmp_path):
    """Both RPC directions run through TCP proxies; the test cuts them for three times the
    call deadline mid-federation, then heals them. The federation completes, no round is
    aggregated twice, and the model is the exact replay of every round once."""
    to_aggregator, to_coordinator = TcpProxy(), TcpProxy()
    coordinator_rpc = free_port()
    to_coordinator.target = ("127.0.0.1", coordinator_rpc)
    try:
        federation = start_federation(
            coordinator={
                **COORDINATOR,
                "federation.rounds": 4,
                "federation.heartbeat_timeout_secs": 10,
                "aggregator.call_timeout_secs": 1,
                "aggregator.rpc_address": f"127.0.0.1:{to_aggregator.port}",
                "rpc.port": coordinator_rpc,
                "rpc.advertise_address": f"127.0.0.1:{to_coordinator.port}",
            },
            aggregator={"link.call_timeout_secs": 1},
        )
        aggregator_rpc = int(federation.aggregator.addresses["rpc"].rsplit(":")[1])
        to_aggregator.target = ("127.0.0.1", aggregator_rpc)
        people = {"a": Adder(1.0, 10, train_secs=0.3), "b": Adder(3.0, 30, train_secs=0.3)}
        reports: dict = {}
        threads = [
            run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()
        ]
        federation.wait_for(lambda s: len(aggregated_rounds(s)) >= 2, what="round 1 to close")
        to_aggregator.partition()
        to_coordinator.partition()
        time.sleep(3)
        cut = federation.status()
        assert cut["aggregator"]["connected"] is False, cut["aggregator"]
        to_aggregator.heal()
        to_coordinator.heal()
        status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
        for thread in threads:
            thread.join(timeout=20)
    finally:
        to_aggregator.close()
        to_coordinator.close()
    assert {r.final_action for r in reports.values()} == {"finish"}
    rounds = aggregated_rounds(status)
    assert sorted(rounds) == [0, 1, 2, 3, 4], status["history"]
    np.testing.assert_allclose(model_value(federation), 2.5 * 4, rtol=1e-6)


def test_dummy_stays_exact_across_every_restart(start_federation, redis_server, tmp_path):
    """dummy.py --check-expected over eight rounds while, mid-round, the coordinator is killed,
    then the aggregator, then both, and then Redis restarts empty: every round is aggregated
    exactly once, none redone, and the final model is exactly what the history predicts."""
    coordinator = {
        **COORDINATOR,
        "federation.rounds": 8,
        "federation.min_clients": 4,
        "federation.heartbeat_timeout_secs": 10,
        "aggregator.call_timeout_secs": 1,
        **durable(redis_server, tmp_path / "coordinator"),
    }
    aggregator = durable(redis_server, tmp_path / "aggregator")
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    dummy = subprocess.Popen(
        [sys.executable, str(ROOT / "python" / "client_examples" / "dummy.py"),
         "--number-of-participants", "4", "--model-size", "4kB", "--heartbeat-period", "0.2",
         "--train-secs", "0.4", "--check-expected", "--coordinator-url",
         federation.coordinator_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:

        def mid_round(after: int):
            return federation.wait_for(
                lambda s: len(aggregated_rounds(s)) > after and s["phase"] == "training",
                what=f"round {after + 1} to be training",
            )

        before = mid_round(2)
        federation.restart_coordinator(tmp_path, coordinator)
        mid_round(4)
        federation.restart_aggregator(tmp_path, aggregator)
        mid_round(5)
        kill_both_and_restart(federation, tmp_path, coordinator, aggregator)
        mid_round(7)
        redis_server.restart()
        output, _ = dummy.communicate(timeout=120)
    finally:
        dummy.kill()
    assert dummy.returncode == 0, output
    assert "equals the expected weighted average" in output, output
    status = federation.status()
    assert aggregated_rounds(status) == list(range(9)), status["history"]
    assert not [e for e in status["history"] if e["outcome"] == "failed"], status["history"]
    # One history from the first round on, with the same participants throughout (nobody
    # joined again), and no update sent twice: round 0 takes one, rounds 1..8 four each.
    first = [(e["round"], e["delivered"]) for e in before["history"] if e["outcome"]]
    assert [(e["round"], e["delivered"]) for e in status["history"]][: len(first)] == first
    assert len(status["participants"]) == 4
    assert "33 updates accepted" in output, output

    # Both restarted once more: the coordinator's history (read back from Redis) and the
    # aggregator's stored models and manifests still tell the same story, file for file.
    kill_both_and_restart(federation, tmp_path, coordinator, aggregator)
    url = federation.coordinator_url
    history = requests.get(f"{url}/v1/history", timeout=5).json()["rounds"]
    manifests = requests.get(f"{url}/v1/models", timeout=5).json()["models"]
    assert [r["round"] for r in history] == [m["round"] for m in manifests] == list(range(9))
    records = {e["round"]: e for e in federation.status()["history"]}
    for summary, manifest in zip(history, manifests, strict=True):
        record = records[summary["round"]]
        assert manifest["attempt"] == summary["attempt"]
        assert manifest["contributors"] == {
            d["participant_id"]: d["n_samples"] for d in record["deliveries"]
        }
        served = requests.get(f"{url}/v1/rounds/{manifest['round']}/model", timeout=10)
        assert hashlib.sha256(served.content).hexdigest() == manifest["sha256"]


def test_a_server_optimizer_keeps_its_moments_across_an_aggregator_restart(
    start_federation, redis_server, tmp_path
):
    """FedAdam's moments are saved beside each round's model: an aggregator killed mid-round
    steps on from them, and the federation ends where one that was never killed ends (moments
    begun again from zero would take it elsewhere: server_opt's
    `a_saved_state_carries_the_optimizer_on_exactly_in_a_new_aggregator`)."""
    initial = tmp_path / "initial.safetensors"
    save_file({"layer/w": np.zeros((100, 10), np.float32), "layer/b": np.zeros(10, np.float32)},
              str(initial))  # fmt: skip
    coordinator = {**COORDINATOR, "federation.rounds": 4, "aggregator.call_timeout_secs": 1}

    def run(kill: bool, store: dict) -> float:
        aggregator = {
            "model.initial_model": initial,
            "aggregation.strategy": "fedadam",
            "aggregation.deterministic": "true",
            **store,
        }
        federation = start_federation(coordinator={**coordinator, **store}, aggregator=aggregator)
        people = {"a": Adder(1.0, 10, train_secs=0.3), "b": Adder(3.0, 30, train_secs=0.3)}
        reports: dict = {}
        threads = [
            run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()
        ]
        if kill:
            federation.wait_for(
                lambda s: len(aggregated_rounds(s)) >= 2 and s["phase"] == "training",
                what="round 3 to be training",
            )
            federation.restart_aggregator(tmp_path, aggregator)
        status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
        for thread in threads:
            thread.join(timeout=20)
        assert aggregated_rounds(status) == [1, 2, 3, 4], status["history"]
        value = model_value(federation)
        federation.stop()
        return value

    never_killed = run(False, {})
    killed = run(True, durable(redis_server, tmp_path / "aggregator"))
    np.testing.assert_allclose(killed, never_killed, rtol=1e-5)
    states = sorted(p.name for p in (tmp_path / "aggregator" / "strategy").iterdir())
    assert states == ["round-000003.state", "round-000004.state"], states
    restarted_logs = [p.read_text() for p in tmp_path.glob("aggregator*.log")]
    assert any("the rule's state resumed" in text for text in restarted_logs)


def test_an_aggregator_whose_store_lost_its_round_refuses_to_start(
    start_federation, redis_server, tmp_path
):
    """Updates on disk that the store knows nothing of (Redis and the aggregator lost together)
    cannot be told apart from stale ones: the aggregator says so at start-up rather than start
    without them."""
    coordinator, aggregator = one_round(redis_server, tmp_path)
    federation = start_federation(coordinator=coordinator, aggregator=aggregator)
    people = three_people(c_secs=30.0)
    reports: dict = {}
    for name, person in people.items():
        run_in_thread(person, federation.coordinator_url, name, reports)
    wait_for_accepted(federation, 2)
    federation.aggregator.process.kill()
    federation.aggregator.process.wait()
    redis_server.restart()
    try:
        federation.restart_aggregator(tmp_path, aggregator)
    except RuntimeError as exited:
        message = str(exited)
    else:
        raise AssertionError("the aggregator started without the updates it had accepted")
    finally:
        for person in people.values():
            person.stop.set()
    assert "holds no round" in message and "cannot be recovered" in message, message
    assert any((tmp_path / "aggregator" / "updates").iterdir()), "nothing was deleted"
