"""Bad input gets a clear 4xx JSON error and changes no state.

Two participants are driven by hand over HTTP through one round, on an aggregator started with
an initial model. Every bad request is checked for its status and error code, and for leaving
the aggregator's accepted set unchanged; at the end the new global model must be exactly the
weighted average of the two good updates.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from rondo.safetensors_io import decode, encode

SHAPES = {"w": (4, 3), "b": (3,)}
MAX_BODY = 4096


def weights(value: float, dtype=np.float32) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, dtype) for name, shape in SHAPES.items()}


def upload_bytes(tensors: dict[str, np.ndarray], n_samples: str | None = "1") -> bytes:
    metadata = {} if n_samples is None else {"rondo.n_samples": n_samples}
    return encode(tensors, metadata)


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


class Person:
    def __init__(self, coordinator_url: str, name: str) -> None:
        self.url = coordinator_url
        answer = requests.post(f"{coordinator_url}/v1/participants", json={"name": name}).json()
        self.id = answer["participant_id"]
        self.secret = answer["secret"]

    def post(self, what: str, secret: str | None = None) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/participants/{self.id}/{what}",
            headers={"Authorization": f"Bearer {secret or self.secret}"},
            timeout=10,
        )


@pytest.fixture
def round_one(start_federation, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 2,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={
            "model.initial_model": initial,
            "api.max_body_bytes": MAX_BODY,
            "api.upload_idle_timeout_secs": 1,
        },
    )
    a = Person(federation.coordinator_url, "a")
    b = Person(federation.coordinator_url, "b")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    assert a.post("heartbeat").json()["action"] == "train"
    tickets = {p.id: p.post("start_training").json() for p in (a, b)}
    return federation, a, b, tickets


def test_coordinator_rejects_bad_requests_without_changing_state(round_one):
    federation, a, b, _ = round_one
    url = federation.coordinator_url
    before = federation.status()

    unknown = requests.post(f"{url}/v1/participants/no-such-id/heartbeat",
                            headers={"Authorization": "Bearer x"})  # fmt: skip
    assert_error(unknown, 404, "unknown_participant")
    unknown = requests.post(f"{url}/v1/participants/no-such-id/start_training",
                            headers={"Authorization": "Bearer x"})  # fmt: skip
    assert_error(unknown, 404, "unknown_participant")
    assert_error(a.post("heartbeat", secret="wrong"), 401, "invalid_secret")
    assert_error(requests.post(f"{url}/v1/participants/{a.id}/heartbeat"), 401, "missing_secret")
    assert_error(requests.post(f"{url}/v1/participants", data="{nope"), 400, "invalid_body")
    too_big = json.dumps({"name": "x" * 100_000})
    assert_error(requests.post(f"{url}/v1/participants", data=too_big), 413, "invalid_body")

    after = federation.status()
    assert [p["participant_id"] for p in after["participants"]] == [
        p["participant_id"] for p in before["participants"]
    ]
    assert after["history"][-1]["started"] == before["history"][-1]["started"]


def test_aggregator_rejects_bad_uploads_and_averages_the_good_ones(round_one):
    federation, a, b, tickets = round_one
    ta, tb = tickets[a.id], tickets[b.id]
    assert ta["round"] == 1 and ta["model_url"].endswith("/v1/rounds/1/model")

    def upload(ticket, body: bytes, token: str | None = None, url: str | None = None):
        return requests.post(
            url or ticket["upload_url"],
            data=body,
            headers={"Authorization": f"Bearer {token or ticket['token']}"},
            timeout=10,
        )

    def accepted() -> list[str]:
        return federation.aggregator_status()["accepted"]

    # Downloads need the right token and round.
    model = requests.get(ta["model_url"], headers={"Authorization": f"Bearer {ta['token']}"})
    assert model.status_code == 200
    np.testing.assert_array_equal(decode(model.content)[0]["w"], np.zeros((4, 3), np.float32))
    assert_error(requests.get(ta["model_url"]), 401, "missing_token")
    wrong_round_url = ta["model_url"].replace("/rounds/1/", "/rounds/2/")
    assert_error(requests.get(wrong_round_url, headers={"Authorization": f"Bearer {ta['token']}"}),
                 409, "wrong_round")  # fmt: skip

    good_a = upload_bytes(weights(1.0), n_samples="1")
    cases = [
        ("wrong token", upload(ta, good_a, token="0" * 64), 401, "invalid_token"),
        ("wrong round", upload(ta, good_a, url=ta["upload_url"].replace("/1/", "/2/")), 409,
         "wrong_round"),
        ("not safetensors", upload(ta, b"\x05\x00\x00\x00\x00\x00\x00\x00hello"), 400,
         "malformed_safetensors"),
        ("truncated", upload(ta, good_a[:-5]), 400, "upload_incomplete"),
        ("trailing bytes", upload(ta, good_a + b"\x00" * 4), 400, "malformed_safetensors"),
        ("lying header length", upload(ta, struct.pack("<Q", 10**6) + good_a[8:]), 413,
         "body_too_large"),
        ("missing tensor", upload(ta, upload_bytes({"w": weights(1.0)["w"]})), 400,
         "model_mismatch"),
        ("extra tensor", upload(ta, upload_bytes({**weights(1.0), "c": np.ones(2, np.float32)})),
         400, "model_mismatch"),
        ("renamed tensor", upload(ta, upload_bytes({"w": weights(1.0)["w"],
                                                    "bias": weights(1.0)["b"]})), 400,
         "model_mismatch"),
        ("wrong shape", upload(ta, upload_bytes({"w": np.ones((3, 4), np.float32),
                                                 "b": np.ones(3, np.float32)})), 400,
         "model_mismatch"),
        ("wrong dtype", upload(ta, upload_bytes(weights(1.0, np.float64))), 400,
         "model_mismatch"),
        ("NaN", upload(ta, upload_bytes({**weights(1.0), "b": np.array([1, np.nan, 1],
                                                                      np.float32)})), 400,
         "non_finite_values"),
        ("Inf", upload(ta, upload_bytes({**weights(1.0), "w": np.full((4, 3), np.inf,
                                                                     np.float32)})), 400,
         "non_finite_values"),
        ("no n_samples", upload(ta, upload_bytes(weights(1.0), n_samples=None)), 400,
         "invalid_metadata"),
        ("zero n_samples", upload(ta, upload_bytes(weights(1.0), n_samples="0")), 400,
         "invalid_metadata"),
        ("too large", upload(ta, upload_bytes({"w": np.ones((4, 3), np.float32),
                                               "b": np.ones(MAX_BODY, np.float32)})), 413,
         "body_too_large"),
    ]  # fmt: skip
    for what, response, status, code in cases:
        assert response.status_code == status, (what, response.text)
        assert_error(response, status, code)
        assert accepted() == [], f"{what} changed the accepted set"

    ok = upload(ta, good_a)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"accepted": True, "round": 1, "participant_id": a.id, "n_samples": 1}
    assert accepted() == [a.id]
    assert_error(upload(ta, upload_bytes(weights(50.0))), 409, "duplicate_update")
    assert accepted() == [a.id]

    assert upload(tb, upload_bytes(weights(5.0), n_samples="3")).status_code == 200
    status = federation.wait_for(
        lambda s: s["history"][-1]["round"] == 2 or s["phase"] == "finished",
        what="round 1 to close",
    )
    round1 = next(e for e in status["history"] if e["round"] == 1)
    assert round1["outcome"] == "aggregated"
    assert sorted(round1["delivered"]) == sorted([a.id, b.id])
    rejected = {r["reason"].split(":")[0] for r in round1["rejections"]}
    assert {"model_mismatch", "non_finite_values", "malformed_safetensors"} <= rejected

    final = requests.get(f"{federation.aggregator_url}/v1/model")
    assert final.headers["x-rondo-round"] == "1"
    model, metadata = decode(final.content)
    assert metadata["rondo.round"] == "1"
    # (1·1 + 5·3) / 4 = 4, exactly: nothing from the rejected uploads leaked in.
    for name, shape in SHAPES.items():
        np.testing.assert_array_equal(model[name], np.full(shape, 4.0, np.float32))

    # The round is closed: its tokens have expired.
    assert_error(upload(ta, good_a), 401, "token_expired")


def test_a_stalled_upload_is_dropped_and_changes_nothing(round_one):
    """A participant that stops sending mid-upload gets 408 `upload_stalled` once nothing has
    arrived for `api.upload_idle_timeout_secs`, and can then upload properly."""
    federation, a, _, tickets = round_one
    ticket = tickets[a.id]
    body = upload_bytes(weights(1.0))
    host, port = federation.aggregator.addresses["api"].rsplit(":", 1)
    path = "/" + ticket["upload_url"].split("/", 3)[3]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {ticket['token']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:40])  # then nothing more
        started = time.monotonic()
        answer = sock.recv(65536).decode(errors="replace")
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"code":"upload_stalled"' in answer
    assert 0.5 < waited < 8, waited
    assert federation.aggregator_status()["accepted"] == []
    ok = requests.post(
        ticket["upload_url"], data=body, headers={"Authorization": f"Bearer {ticket['token']}"}
    )
    assert ok.status_code == 200, ok.text
