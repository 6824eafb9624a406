"""rondo.models: downloading the global model from a (fake) aggregator's GET /v1/model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import rondo.models
from rondo.safetensors_io import encode


class FakeAggregator(ThreadingHTTPServer):
    body: bytes | None = None  # None: 404 no_model
    requests: list[tuple[str, str | None]]


class Handler(BaseHTTPRequestHandler):
    server: FakeAggregator

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        if self.path != "/v1/model":
            self._send(404, json.dumps({"error": {"code": "unknown_route", "message": "?"}}))
        elif self.server.body is None:
            self._send(404, json.dumps({"error": {"code": "no_model", "message": "none yet"}}))
        else:
            self._send(200, self.server.body)

    def _send(self, status: int, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def aggregator() -> Iterator[FakeAggregator]:
    server = FakeAggregator(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server: FakeAggregator) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


MODEL = {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "dense/bias": np.ones(3)}


def test_latest_model(aggregator: FakeAggregator) -> None:
    aggregator.body = encode(MODEL, {"rondo.round": "7"})
    weights = rondo.models.download_model(url(aggregator))
    assert sorted(weights) == ["dense/bias", "dense/kernel"]
    np.testing.assert_array_equal(weights["dense/kernel"], MODEL["dense/kernel"])
    assert weights["dense/bias"].dtype == np.float64
    assert aggregator.requests == [("/v1/model", None)]  # no credentials needed

    model = rondo.models.fetch_model(url(aggregator), round=7)
    assert model.round == 7 and model.metadata == {"rondo.round": "7"}


def test_another_round_is_not_available(aggregator: FakeAggregator) -> None:
    aggregator.body = encode(MODEL, {"rondo.round": "7"})
    with pytest.raises(rondo.models.ModelNotAvailable, match="round 7, not round 3") as info:
        rondo.models.download_model(url(aggregator), round=3)
    assert (info.value.requested, info.value.available) == (3, 7)


def test_no_model_yet(aggregator: FakeAggregator) -> None:
    with pytest.raises(rondo.models.ModelNotAvailable, match="no global model yet") as info:
        rondo.models.download_model(url(aggregator))
    assert info.value.available is None


def test_not_a_model(aggregator: FakeAggregator) -> None:
    aggregator.body = b"hello, not safetensors"
    with pytest.raises(rondo.NetworkError, match="not a valid model"):
        rondo.models.download_model(url(aggregator))


def test_bad_round_argument() -> None:
    with pytest.raises(ValueError):
        rondo.models.download_model("http://127.0.0.1:9", round=-1)


def test_unreachable_aggregator() -> None:
    with pytest.raises(rondo.NetworkError):
        rondo.models.download_model("http://127.0.0.1:9", timeout=2)
