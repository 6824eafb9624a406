"""The model store (`store.data_dir`), with the real binaries and SDK participants: the kept
models and manifests are the federation's history, they are durable before the coordinator
counts a round, downloads of them are checked end to end, `keep_models` bounds them, they
outlive the services, a round whose model cannot be kept fails and is run again, and a
federation can start from a kept model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import start_service
from test_config import assert_refused
from test_config import start as start_binary
from test_openapi import check_response, document
from test_rounds import Adder, expected_value, run_in_thread

import rondo
from rondo.safetensors_io import decode

FAST = {"federation.heartbeat_period_secs": 0.2, "federation.heartbeat_timeout_secs": 30}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def stored_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir(data_dir).iterdir())


def run_federation(start_federation, data_dir: Path, rounds: int, people: dict, **aggregator):
    """A federation of `people` over `rounds` training rounds with the store at `data_dir`,
    run to its end; returns it (still running) and its final status."""
    federation = start_federation(
        coordinator={"federation.rounds": rounds, "federation.min_clients": len(people), **FAST},
        aggregator={"store.data_dir": data_dir, **aggregator},
    )
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    for thread in threads:
        thread.join(timeout=10)
    return federation, status


def aggregated_records(status: dict) -> dict[int, dict]:
    return {e["round"]: e for e in status["history"] if e["outcome"] == "aggregated"}


def test_the_store_is_the_federations_history_and_outlives_both_services(
    start_federation, tmp_path
):
    data_dir = tmp_path / "store"
    people = {"a": Adder(1.0, 10), "b": Adder(2.0, 30), "c": Adder(5.0, 7)}
    # Every time the coordinator counts a round, its model and manifest are already on disk.
    seen_missing: list[int] = []
    counted: set[int] = set()
    stop = threading.Event()
    federation_box: dict = {}

    def watch() -> None:
        while not stop.is_set():
            federation = federation_box.get("federation")
            if federation is not None:
                try:
                    rounds = requests.get(f"{federation.coordinator_url}/v1/history", timeout=5)
                    history = rounds.json()["rounds"]
                except (requests.RequestException, ValueError, KeyError):
                    continue
                for r in history:
                    if r["outcome"] == "aggregated" and r["round"] not in counted:
                        counted.add(r["round"])
                        manifest = model_dir(data_dir) / f"round-{r['round']:06}.json"
                        if not manifest.exists():
                            seen_missing.append(r["round"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    original_start = start_federation

    def start_and_watch(**kwargs):
        federation_box["federation"] = original_start(**kwargs)
        return federation_box["federation"]

    federation, status = run_federation(start_and_watch, data_dir, 3, people)
    stop.set()
    watcher.join(timeout=5)
    assert counted == {0, 1, 2, 3}
    assert seen_missing == [], f"rounds counted before their model was on disk: {seen_missing}"

    c, a = federation.coordinator_url, federation.aggregator_url
    history = requests.get(f"{c}/v1/history", timeout=5).json()["rounds"]
    aggregated = [r for r in history if r["outcome"] == "aggregated"]
    records = aggregated_records(status)
    listing = requests.get(f"{a}/v1/models", timeout=5)
    check_response(document("aggregator"), "/v1/models", "get", listing)
    manifests = listing.json()["models"]
    assert listing.json()["keep_models"] == 0
    assert [m["round"] for m in manifests] == [r["round"] for r in aggregated] == [0, 1, 2, 3]
    assert stored_files(data_dir) == [
        f"round-{r:06}.{ext}" for r in range(4) for ext in ("json", "safetensors")
    ]
    for summary, manifest in zip(aggregated, manifests, strict=True):
        r = summary["round"]
        record = records[r]
        assert manifest["attempt"] == summary["attempt"]
        assert manifest["source"] == "aggregated"
        assert manifest["strategy"] == "fedavg"
        assert manifest["contributors"] == {
            d["participant_id"]: d["n_samples"] for d in record["deliveries"]
        }
        assert manifest["total_samples"] == summary["total_samples"]
        assert "training_metrics" not in manifest
        assert manifest["rondo_version"] == rondo.__version__
        assert manifest["written_at"].endswith("Z")
        on_disk = (model_dir(data_dir) / manifest["file"]).read_bytes()
        assert manifest["file"] == f"round-{r:06}.safetensors"
        assert (manifest["sha256"], manifest["bytes"]) == (sha256(on_disk), len(on_disk))
        assert json.loads((model_dir(data_dir) / f"round-{r:06}.json").read_text()) == manifest
        assert decode(on_disk)[1]["rondo.round"] == str(r)
        one = requests.get(f"{a}/v1/rounds/{r}/manifest", timeout=5)
        check_response(document("aggregator"), "/v1/rounds/{round}/manifest", "get", one)
        assert one.json() == manifest

        # Through the coordinator's redirect, without credentials.
        via = requests.get(f"{c}/v1/rounds/{r}/model", timeout=10)
        assert [h.status_code for h in via.history] == [307]
        check_response(document("coordinator"), "/v1/rounds/{round}/model", "get", via.history[0])
        assert via.history[0].headers["location"] == f"{a}/v1/rounds/{r}/model"
        check_response(document("aggregator"), "/v1/rounds/{round}/model", "get", via)
        assert sha256(via.content) == manifest["sha256"] == via.headers["x-rondo-sha256"]
        assert int(via.headers["content-length"]) == manifest["bytes"]
        assert via.headers["x-rondo-round"] == str(r)

        # And with the SDK, through the coordinator too.
        path = tmp_path / f"downloaded-{r}.safetensors"
        assert rondo.download_model(c, path, round=r) == manifest
        assert sha256(path.read_bytes()) == manifest["sha256"]
    assert [p.name for p in tmp_path.glob(".downloaded-*")] == [], "no temp file left behind"

    # The newest kept model is the federation's result, and what GET /v1/model serves.
    latest = rondo.download_model(c, tmp_path / "latest.safetensors")
    assert latest == manifests[-1]
    final = (tmp_path / "latest.safetensors").read_bytes()
    assert final == requests.get(f"{c}/v1/model", timeout=10).content
    weights, _ = decode(final)
    np.testing.assert_allclose(weights["layer/w"], expected_value(status, people), rtol=1e-6)
    for manifest in manifests:
        r = manifest["round"]
        fed = requests.get(f"{c}/v1/rounds/{r}/manifest", timeout=5)
        assert [h.status_code for h in fed.history] == [307] and fed.json() == manifest
    assert requests.get(f"{c}/v1/models", timeout=5).json()["models"] == manifests

    # A round the store does not keep, and the store in the status.
    missing = requests.get(f"{a}/v1/rounds/9/model", timeout=5)
    check_response(document("aggregator"), "/v1/rounds/{round}/model", "get", missing)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_stored")
    with pytest.raises(rondo.ModelNotAvailable, match="not in the model store"):
        rondo.download_model(c, tmp_path / "nine.safetensors", round=9)
    assert not (tmp_path / "nine.safetensors").exists()
    agg_status = requests.get(f"{a}/v1/status", timeout=5)
    check_response(document("aggregator"), "/v1/status", "get", agg_status)
    assert agg_status.json()["store"] == {
        "dir": str(model_dir(data_dir)),
        "keep_models": 0,
        "models": 4,
        "latest_round": 3,
        "errors": 0,
        "last_error": None,
    }

    # Both services stop; an aggregator started again on the same directory lists and serves
    # every kept model, checked.
    federation.stop()
    again = start_service("aggregator", tmp_path, {"store.data_dir": data_dir}, tag=".again")
    # The fixture stops (and shows the log of) the federation's aggregator: now this one.
    federation.services.append(federation.aggregator)
    federation.aggregator = again
    assert requests.get(f"{again.url}/v1/models", timeout=5).json()["models"] == manifests
    for manifest in manifests:
        r = manifest["round"]
        served = requests.get(f"{again.url}/v1/rounds/{r}/model", timeout=10)
        assert served.status_code == 200
        assert sha256(served.content) == manifest["sha256"] == served.headers["x-rondo-sha256"]
        path = tmp_path / f"again-{r}.safetensors"
        assert rondo.download_model(again.url, path, round=r) == manifest
        assert path.read_bytes() == served.content

    # A kept file that no longer matches its manifest is refused, never served.
    kept = model_dir(data_dir) / "round-000002.safetensors"
    damaged = bytearray(kept.read_bytes())
    damaged[-1] ^= 0x01
    kept.write_bytes(bytes(damaged))
    refused = requests.get(f"{again.url}/v1/rounds/2/model", timeout=10)
    check_response(document("aggregator"), "/v1/rounds/{round}/model", "get", refused)
    assert (refused.status_code, refused.json()["error"]["code"]) == (500, "stored_model_corrupted")
    with pytest.raises(rondo.ApiError, match="stored_model_corrupted"):
        rondo.download_model(again.url, tmp_path / "two.safetensors", round=2)
    assert not (tmp_path / "two.safetensors").exists()


def test_keep_models_keeps_only_the_newest_rounds(start_federation, tmp_path):
    data_dir = tmp_path / "store"
    people = {"a": Adder(1.0, 10), "b": Adder(3.0, 10)}
    federation, status = run_federation(
        start_federation, data_dir, 4, people, **{"store.keep_models": 2}
    )
    a = federation.aggregator_url
    assert sorted(aggregated_records(status)) == [0, 1, 2, 3, 4]
    manifests = requests.get(f"{a}/v1/models", timeout=5).json()["models"]
    assert [m["round"] for m in manifests] == [3, 4]
    assert stored_files(data_dir) == [
        "round-000003.json",
        "round-000003.safetensors",
        "round-000004.json",
        "round-000004.safetensors",
    ]
    for r in (0, 1, 2):
        for path in (f"/v1/rounds/{r}/model", f"/v1/rounds/{r}/manifest"):
            gone = requests.get(f"{a}{path}", timeout=5)
            assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_stored")
    assert "from 3 to 4" in gone.json()["error"]["message"]
    # Round 4 is the federation's result: every weight moved by 2 (the mean of 1 and 3) per
    # training round.
    weights, _ = decode((model_dir(data_dir) / "round-000004.safetensors").read_bytes())
    np.testing.assert_allclose(weights["layer/w"], 8.0, rtol=1e-6)


def test_a_federation_started_from_a_stored_model_begins_from_its_weights(
    start_federation, tmp_path
):
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first, _ = run_federation(start_federation, first_dir, 2, {"a": Adder(1.5, 10)})
    first.stop()
    stored = model_dir(first_dir) / "round-000002.safetensors"
    stored_weights, metadata = decode(stored.read_bytes())
    assert metadata["rondo.round"] == "2"
    np.testing.assert_allclose(stored_weights["layer/w"], 3.0, rtol=1e-6)

    people = {"b": Adder(1.0, 10, train_secs=0.5), "c": Adder(3.0, 30, train_secs=0.5)}
    second = start_federation(
        coordinator={"federation.rounds": 1, "federation.min_clients": 2, **FAST},
        aggregator={"store.data_dir": second_dir, "model.initial_model": stored},
    )
    # Before any round: the model served is the stored one's tensors, under round 0.
    initial = requests.get(f"{second.aggregator_url}/v1/model", timeout=10)
    assert initial.headers["x-rondo-round"] == "0"
    weights, metadata = decode(initial.content)
    assert metadata == {"rondo.round": "0"}
    assert weights.keys() == stored_weights.keys()
    for name, values in stored_weights.items():
        assert weights[name].dtype == values.dtype
        assert weights[name].tobytes() == values.tobytes(), name
    # The new store keeps it as its round 0, an initial model.
    zero = requests.get(f"{second.aggregator_url}/v1/rounds/0/manifest", timeout=5).json()
    assert (zero["source"], zero["contributors"], zero["total_samples"]) == ("initial_model", {}, 0)
    assert "strategy" not in zero
    assert zero["sha256"] == sha256(initial.content)

    reports: dict = {}
    threads = [run_in_thread(p, second.coordinator_url, n, reports) for n, p in people.items()]
    status = second.wait_for(lambda s: s["phase"] == "finished", what="round 1")
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(aggregated_records(status)) == [1], "round 0 is the stored model"
    after, _ = decode((model_dir(second_dir) / "round-000001.safetensors").read_bytes())
    np.testing.assert_allclose(after["layer/w"], stored_weights["layer/w"] + 2.5, rtol=1e-6)


def test_a_round_whose_model_cannot_be_kept_fails_and_is_run_again(start_federation, tmp_path):
    data_dir = tmp_path / "store"
    people = {"a": Adder(1.0, 10, train_secs=0.3), "b": Adder(2.0, 10, train_secs=0.3)}
    federation = start_federation(
        coordinator={"federation.rounds": 2, "federation.min_clients": 2, **FAST},
        aggregator={"store.data_dir": data_dir},
    )
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    federation.wait_for(
        lambda s: s["round"] == 1 and s["phase"] == "training", what="round 1 to train"
    )
    # The models directory becomes a file: every write in it fails, root or not.
    models, away = model_dir(data_dir), data_dir / "models.away"
    models.rename(away)
    models.write_text("not a directory")
    failed = federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] == "failed" for e in s["history"]),
        what="round 1 to fail",
    )
    reason = next(e["reason"] for e in failed["history"] if e["outcome"] == "failed")
    assert "model store could not keep the model of round 1" in reason, reason
    store = federation.aggregator_status()["store"]
    assert store["errors"] >= 1 and store["last_error"]["round"] == 1, store
    metrics = requests.get(f"{federation.aggregator_url}/metrics", timeout=5).text
    assert "rondo_aggregator_model_store_errors_total 0" not in metrics
    assert "\nrondo_aggregator_model_store_errors_total " in metrics
    # The served model stayed round 0's.
    assert federation.aggregator_status()["model"]["round"] == 0

    models.unlink()
    away.rename(models)
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="the retried rounds")
    for thread in threads:
        thread.join(timeout=10)
    records = aggregated_records(status)
    assert sorted(records) == [0, 1, 2]
    assert records[1]["attempt"] >= 1
    manifests = requests.get(f"{federation.aggregator_url}/v1/models", timeout=5).json()["models"]
    assert [(m["round"], m["attempt"]) for m in manifests] == [
        (r, records[r]["attempt"]) for r in (0, 1, 2)
    ]
    weights, _ = decode((models / "round-000002.safetensors").read_bytes())
    np.testing.assert_allclose(weights["layer/w"], 3.0, rtol=1e-6)


def test_a_data_dir_that_cannot_be_written_stops_the_aggregator_at_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for data_dir in (blocker, blocker / "below"):
        code, out, err = start_binary(
            "aggregator", tmp_path, {"RONDO__STORE__DATA_DIR": str(data_dir)}
        )
        assert_refused("aggregator", code, out, err, "store.data_dir")
        assert "must be a writable directory" in err, err
    code, out, err = start_binary("aggregator", tmp_path, {"RONDO__STORE__KEEP_MODELS": "-1"})
    assert_refused("aggregator", code, out, err, "store.keep_models")


def test_without_a_store_nothing_changes_and_the_store_routes_say_so(start_federation, tmp_path):
    federation = start_federation()
    a, c = federation.aggregator_url, federation.coordinator_url
    # The token path is as it always was: no header, no model.
    anonymous = requests.get(f"{a}/v1/rounds/1/model", timeout=5)
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "missing_token")
    for path, documented in (
        ("/v1/models", "/v1/models"),
        ("/v1/rounds/1/manifest", "/v1/rounds/{round}/manifest"),
    ):
        response = requests.get(f"{a}{path}", timeout=5)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "no_model_store")
        check_response(document("aggregator"), documented, "get", response)
    assert federation.aggregator_status()["store"] is None
    with pytest.raises(rondo.ModelNotAvailable, match="keeps no models"):
        rondo.download_model(c, tmp_path / "x.safetensors")
    assert list(tmp_path.glob("*.safetensors*")) == []
    bad = requests.get(f"{c}/v1/rounds/01/model", timeout=5, allow_redirects=False)
    check_response(document("coordinator"), "/v1/rounds/{round}/model", "get", bad)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_round")

    # A coordinator that has not attached to its aggregator cannot say where models are.
    alone = start_service(
        "coordinator", tmp_path, {"aggregator.rpc_address": "127.0.0.1:9"}, ".alone"
    )
    federation.services.append(alone)
    try:
        for path, documented in (
            ("/v1/model", "/v1/model"),
            ("/v1/rounds/3/model", "/v1/rounds/{round}/model"),
        ):
            unattached = requests.get(f"{alone.url}{path}", timeout=5)
            check_response(document("coordinator"), documented, "get", unattached)
            assert (unattached.status_code, unattached.json()["error"]["code"]) == (
                503,
                "aggregator_unavailable",
            )
    finally:
        alone.stop()
