"""Uploads are parsed strictly and their metadata is bounded (`[limits]` of the aggregator).

Participants are driven by hand over HTTP, with hand-made safetensors files, against the real
binaries. Every refusal is checked for its status and error code and for leaving the round as
it was: the same participant's good upload is accepted afterwards, and the round's model is
exactly the weighted average of the good updates.
"""

from __future__ import annotations

import http.client
import json
import struct
import time

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file
from test_bad_input import SHAPES, Person, weights

from rondo.safetensors_io import decode, encode

MAX_BODY = 64 << 20
U64_MAX = 2**64 - 1
# The defaults of `[limits]` in configs/dev-aggregator.toml.
MAX_N_SAMPLES = 1_000_000_000
MAX_METRICS = 64
MAX_METRIC_KEY_BYTES = 128
MAX_METRICS_BYTES = 16 * 1024


def upload_bytes(tensors: dict[str, np.ndarray], n_samples: str = "1", **metadata: str) -> bytes:
    return encode(tensors, {"rondo.n_samples": n_samples, **metadata})


def metrics_upload(metrics: str) -> bytes:
    return upload_bytes(weights(1.0), "1", **{"rondo.metrics": metrics})


def raw_file(header: str, data: bytes) -> bytes:
    """A safetensors file with `header` exactly as given (JSON text, keys as written)."""
    text = header.encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def header_of(file: bytes) -> dict:
    (length,) = struct.unpack("<Q", file[:8])
    return json.loads(file[8 : 8 + length])


def start_training(person: Person) -> dict:
    answer = person.post("start_training")
    assert answer.status_code == 200, answer.text
    return answer.json()


def upload(ticket: dict, body: bytes) -> requests.Response:
    return requests.post(
        ticket["upload_url"],
        data=body,
        headers={"Authorization": f"Bearer {ticket['token']}"},
        timeout=30,
    )


def raw_request(base_url: str, method: str, path: str, token: str, body: bytes = b"") -> tuple:
    """`path` sent exactly as written (requests would decode `%31` to `1` before sending)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"})
        answer = connection.getresponse()
        return answer.status, answer.getheader("content-type", ""), answer.read()
    finally:
        connection.close()


def assert_error(response: requests.Response, status: int, code: str, says: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert says in error["message"], error


@pytest.fixture
def round_one(start_federation, tmp_path):
    """Round 1 open for participants `a` and `b` (the only round), on the initial model 0."""
    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={"model.initial_model": initial, "api.max_body_bytes": MAX_BODY},
    )
    a = Person(federation.coordinator_url, "a")
    b = Person(federation.coordinator_url, "b")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    return federation, start_training(a), start_training(b)


def accepted(federation) -> list[str]:
    return federation.aggregator_status()["accepted"]


def finish_round(federation, ta: dict, tb: dict, a_value: float, b_value: float) -> dict:
    """Uploads a's update (weight 1) and b's (weight 3); returns the model round 1 produced."""
    ok = upload(ta, upload_bytes(weights(a_value), "1"))
    assert ok.status_code == 200, ok.text
    ok = upload(tb, upload_bytes(weights(b_value), "3"))
    assert ok.status_code == 200, ok.text
    federation.wait_for(lambda s: s["phase"] == "finished", what="round 1 to close")
    final = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert final.headers["x-rondo-round"] == "1"
    return decode(final.content)[0]


def test_refused_uploads_name_the_rule_and_change_nothing(round_one):
    federation, ta, tb = round_one
    good = upload_bytes(weights(1.0))
    data = b"".join(np.full(s, 1.0, np.float32).tobytes() for s in SHAPES.values())
    w_info = '{"dtype":"F32","shape":[4,3],"data_offsets":[0,48]}'
    b_info = '{"dtype":"F32","shape":[3],"data_offsets":[48,60]}'
    many = json.dumps({f"m{i}": i for i in range(MAX_METRICS + 1)})
    cases = [
        # rondo.n_samples: one spelling, and a bound.
        ("n_samples +5", upload_bytes(weights(1.0), "+5"), 400, "invalid_metadata", "max_n"),
        ("n_samples ' 5'", upload_bytes(weights(1.0), " 5"), 400, "invalid_metadata", "max_n"),
        ("n_samples 05", upload_bytes(weights(1.0), "05"), 400, "invalid_metadata", "max_n"),
        ("n_samples over the limit", upload_bytes(weights(1.0), str(MAX_N_SAMPLES + 1)), 400,
         "invalid_metadata", "limits.max_n_samples"),
        ("n_samples u64::MAX", upload_bytes(weights(1.0), str(U64_MAX)), 400,
         "invalid_metadata", "limits.max_n_samples"),
        # rondo.metrics: a few finite numbers.
        ("too many metrics", metrics_upload(many), 400, "invalid_metrics", "limits.max_metrics"),
        ("long metric name", metrics_upload(json.dumps({"k" * (MAX_METRIC_KEY_BYTES + 1): 1})),
         400, "invalid_metrics", "limits.max_metric_key_bytes"),
        ("long metrics", metrics_upload('{"loss": 1' + " " * MAX_METRICS_BYTES + "}"), 400,
         "invalid_metrics", "limits.max_metrics_bytes"),
        ("infinite metric", metrics_upload('{"loss": 1e400}'), 400, "invalid_metrics", "finite"),
        ("metric twice", metrics_upload('{"loss": 1, "loss": 2}'), 400, "invalid_metrics",
         '"loss" appears more than once'),
        ("metric not a number", metrics_upload('{"loss": "low"}'), 400, "invalid_metrics",
         "rondo.metrics"),
        # Header keys, once each.
        ("tensor twice", raw_file(
            f'{{"__metadata__":{{"rondo.n_samples":"1"}},"w":{w_info},"b":{b_info},'
            f'"w":{w_info}}}', data), 400, "malformed_safetensors", '"w" appears more than once'),
        ("n_samples twice", raw_file(
            '{"__metadata__":{"rondo.n_samples":"1","rondo.n_samples":"1000"},'
            f'"w":{w_info},"b":{b_info}}}', data), 400, "malformed_safetensors",
         '"rondo.n_samples" appears more than once'),
    ]  # fmt: skip
    for what, body, status, code, says in cases:
        response = upload(ta, body)
        assert response.status_code == status, (what, response.text)
        assert_error(response, status, code, says)
        assert accepted(federation) == [], f"{what} changed the accepted set"

    # Round numbers in paths: canonical decimal, as sent (no percent-encoding).
    for method, tail, body in (("POST", "update", good), ("GET", "model", b"")):
        for spelling in ("01", "+1", "%31", "1%20", "4294967297"):
            status, media, answer = raw_request(
                federation.aggregator_url, method, f"/v1/rounds/{spelling}/{tail}", ta["token"],
                body,
            )  # fmt: skip
            assert status == 400, (method, spelling, answer)
            assert media.startswith("application/json")
            assert json.loads(answer)["error"]["code"] == "invalid_round", (spelling, answer)
            assert accepted(federation) == []
    status, _, _ = raw_request(federation.aggregator_url, "GET", "/v1/rounds/1/model", ta["token"])
    assert status == 200

    # (1·1 + 5·3) / 4 = 4, exactly: nothing of the refused uploads leaked in.
    model = finish_round(federation, ta, tb, 1.0, 5.0)
    for name, shape in SHAPES.items():
        np.testing.assert_array_equal(model[name], np.full(shape, 4.0, np.float32))
    round1 = federation.status()["history"][-1]
    assert round1["outcome"] == "aggregated"
    assert len(round1["deliveries"]) == 2


def test_a_huge_n_samples_is_refused_and_the_model_stays_finite(round_one):
    """Finite values of 1e20 weighted by u64::MAX made the f32 sum infinite."""
    federation, ta, tb = round_one
    huge = upload(ta, upload_bytes(weights(1e20), str(U64_MAX)))
    assert_error(huge, 400, "invalid_metadata", "limits.max_n_samples")
    assert accepted(federation) == []
    # The largest weight allowed still gives a finite model with these values.
    top = upload(ta, upload_bytes(weights(1e20), str(MAX_N_SAMPLES)))
    assert top.status_code == 200, top.text
    ok = upload(tb, upload_bytes(weights(1e20), str(MAX_N_SAMPLES)))
    assert ok.status_code == 200, ok.text
    federation.wait_for(lambda s: s["phase"] == "finished", what="round 1 to close")
    model = decode(requests.get(f"{federation.aggregator_url}/v1/model", timeout=10).content)[0]
    for name, shape in SHAPES.items():
        assert np.isfinite(model[name]).all(), model[name]
        np.testing.assert_allclose(model[name], np.full(shape, 1e20, np.float32), rtol=1e-6)


def test_seven_hundred_thousand_metrics_are_refused_quickly(round_one):
    federation, ta, tb = round_one
    metrics = json.dumps({f"metric_{i}": i for i in range(700_000)})
    assert len(metrics) > 15_000_000
    body = metrics_upload(metrics)
    started = time.monotonic()
    refused = upload(ta, body)
    took = time.monotonic() - started
    assert_error(refused, 400, "invalid_metrics", "limits.max_metrics_bytes")
    assert took < 10, took
    assert accepted(federation) == []
    # The federation is not wedged: the round completes, with the expected model.
    model = finish_round(federation, ta, tb, 2.0, 6.0)
    for name, shape in SHAPES.items():
        np.testing.assert_array_equal(model[name], np.full(shape, 5.0, np.float32))


def test_a_scalar_tensor_keeps_its_empty_shape_end_to_end(start_federation):
    """Round 0 takes a model with a 0-dim tensor from an upload; its downloads and every later
    model keep shape [], and an update with shape [1] for it does not match."""
    federation = start_federation(
        coordinator={"federation.rounds": 1, "federation.min_clients": 1},
    )
    person = Person(federation.coordinator_url, "p")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 0 to open")
    ticket = start_training(person)
    assert ticket["round"] == 0
    initial = {"s": np.array(2.0, np.float32), "v": np.array([1.0, 2.0], np.float32)}
    ok = upload(ticket, upload_bytes(initial))
    assert ok.status_code == 200, ok.text

    federation.wait_for(lambda s: s["round"] == 1 and s["phase"] == "training", what="round 1")
    ticket = start_training(person)
    download = requests.get(
        ticket["model_url"], headers={"Authorization": f"Bearer {ticket['token']}"}, timeout=10
    )
    assert download.status_code == 200, download.text
    assert header_of(download.content)["s"]["shape"] == []
    assert decode(download.content)[0]["s"].shape == ()

    as_vector = upload(ticket, upload_bytes({**initial, "s": np.array([4.0], np.float32)}))
    assert_error(as_vector, 400, "model_mismatch", "`s`")
    update = {"s": np.array(4.0, np.float32), "v": np.array([3.0, 4.0], np.float32)}
    ok = upload(ticket, upload_bytes(update))
    assert ok.status_code == 200, ok.text
    federation.wait_for(lambda s: s["phase"] == "finished", what="round 1 to close")
    final = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10).content
    assert header_of(final)["s"]["shape"] == []
    model = decode(final)[0]
    assert model["s"].shape == () and model["s"] == 4.0
    np.testing.assert_array_equal(model["v"], [3.0, 4.0])
