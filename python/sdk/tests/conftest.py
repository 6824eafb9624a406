"""A scripted fake coordinator + aggregator, served with http.server on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from rondo import Participant, Weights
from rondo.safetensors_io import decode, encode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Upload:
    round: int
    participant_id: str
    weights: Weights
    metadata: dict[str, str]
    chunked: bool


@dataclass
class FakeRondo:
    """One coordinator and aggregator for one participant at a time.

    Round 0 is answered with ``model_url: null``; rounds 1..rounds follow, each closing (in
    this fake) as soon as an update is accepted, or ``linger`` heartbeats after a refused one.
    """

    rounds: int = 2
    heartbeat_period: float = 0.02
    # Heartbeat numbers (1-based, over all participants) answered in special ways.
    reject_heartbeats: set[int] = field(default_factory=set)
    forget_heartbeats: set[int] = field(default_factory=set)  # 404 unknown_participant
    drop_heartbeats: set[int] = field(default_factory=set)  # connection closed, no answer
    upload_errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    join_error: tuple[int, str] | None = None
    linger: int = 3

    # Recorded traffic.
    joins: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[tuple[float, str]] = field(default_factory=list)
    start_trainings: list[tuple[str, int]] = field(default_factory=list)
    downloads: list[int] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)

    port: int = 0
    round: int = 0
    refused_heartbeats_left: int | None = None
    global_model: Weights | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, tuple[str, int]] = field(default_factory=dict)

    # --- request handling, called with the lock held ------------------------------------------

    def join(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.join_error:
            return _error(*self.join_error)
        self.joins.append(body)
        pid = f"p{len(self.joins)}"
        self.secrets[pid] = f"secret-{pid}"
        return 201, {
            "participant_id": pid,
            "secret": self.secrets[pid],
            "heartbeat_period_secs": self.heartbeat_period,
        }

    def heartbeat(self, pid: str) -> tuple[int, Any] | None:
        self.heartbeats.append((time.monotonic(), pid))
        n = len(self.heartbeats)
        if n in self.drop_heartbeats:
            return None
        if n in self.forget_heartbeats:
            self.secrets.pop(pid, None)
        if pid not in self.secrets:
            return _error(404, "unknown_participant", f"no participant with id {pid}")
        if n in self.reject_heartbeats:
            del self.secrets[pid]
            return 200, {"action": "rejected", "round": None, "reason": "heartbeat timeout"}
        if self.refused_heartbeats_left is not None:
            self.refused_heartbeats_left -= 1
            if self.refused_heartbeats_left <= 0:  # the round closes without this update
                self.refused_heartbeats_left = None
                self.round += 1
        if self.round > self.rounds:
            return 200, {"action": "finish", "round": None, "reason": None}
        return 200, {"action": "train", "round": self.round, "reason": None}

    def start_training(self, pid: str) -> tuple[int, Any]:
        self.start_trainings.append((pid, self.round))
        token = f"token-{pid}-{self.round}"
        self.tokens[token] = (pid, self.round)
        return 200, {
            "round": self.round,
            "model_url": None if self.round == 0 else f"{self.url}/v1/rounds/{self.round}/model",
            "upload_url": f"{self.url}/v1/rounds/{self.round}/update",
            "token": token,
        }

    def model(self, r: int) -> tuple[int, Any]:
        self.downloads.append(r)
        assert self.global_model is not None
        return 200, encode(self.global_model, {"rondo.round": str(r - 1)})

    def update(self, r: int, pid: str, body: bytes, chunked: bool) -> tuple[int, Any]:
        if r in self.upload_errors:
            self.refused_heartbeats_left = self.linger
            return _error(*self.upload_errors[r])
        weights, metadata = decode(body)
        self.uploads.append(Upload(r, pid, weights, metadata, chunked))
        self.global_model = weights
        self.round += 1
        return 200, {"accepted": True, "round": r, "participant_id": pid, "n_samples": 1}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _error(status: int, code: str, message: str = "scripted error") -> tuple[int, Any]:
    return status, {"error": {"code": code, "message": message}}


def _handler(fake: FakeRondo) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> tuple[bytes, bool]:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts), True
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0))), False

        def _bearer(self) -> str:
            return self.headers.get("Authorization", "").removeprefix("Bearer ")

        def _answer(self, result: tuple[int, Any] | None) -> None:
            if result is None:
                self.close_connection = True
                return
            status, body = result
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body, chunked = self._body()
            parts = self.path.strip("/").split("/")
            with fake.lock:
                if parts == ["v1", "participants"]:
                    return self._answer(fake.join(json.loads(body) if body else {}))
                if parts[:2] == ["v1", "participants"] and len(parts) == 4:
                    pid = parts[2]
                    if pid in fake.secrets and self._bearer() != fake.secrets[pid]:
                        return self._answer(_error(401, "invalid_secret"))
                    if parts[3] == "heartbeat":
                        return self._answer(fake.heartbeat(pid))
                    return self._answer(fake.start_training(pid))
                if parts[:2] == ["v1", "rounds"] and parts[3] == "update":
                    pid, r = fake.tokens.get(self._bearer(), ("", -1))
                    if r != int(parts[2]):
                        return self._answer(_error(401, "invalid_token"))
                    assert self.headers["Content-Type"] == "application/octet-stream"
                    return self._answer(fake.update(r, pid, body, chunked))
            self._answer(_error(404, "not_found"))

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            with fake.lock:
                if parts[:2] == ["v1", "rounds"] and parts[3] == "model":
                    if fake.tokens.get(self._bearer(), ("", -1))[1] != int(parts[2]):
                        return self._answer(_error(401, "invalid_token"))
                    return self._answer(fake.model(int(parts[2])))
            self._answer(_error(404, "not_found"))

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeRondo]]:
    """Factory: ``serve(port=0, **fake_options)`` starts a FakeRondo and returns it."""
    servers: list[ThreadingHTTPServer] = []

    def start(port: int = 0, **options: Any) -> FakeRondo:
        fake = FakeRondo(**options)
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
        server.daemon_threads = True
        fake.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class AddOne(Participant):
    """Starts from a fixed model; each round adds 1 to every element."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Weights]] = []

    def initial_weights(self) -> Weights:
        return {
            "dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
            "dense/bias": np.array([0.5, -0.5], dtype=np.float64),
            "scale": np.array(2.0, dtype=np.float16),
        }

    def train_round(self, weights: Weights, round: int) -> tuple[Weights, int, dict[str, float]]:
        self.seen.append((round, weights))
        return {k: v + v.dtype.type(1) for k, v in weights.items()}, 5, {"loss": 0.5 / round}
