"""A scripted fake coordinator + aggregator, served with http.server on a loopback port."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
    this fake) as soon as an update is accepted, or ``linger`` heartbeats after a refused
    upload or a truncated download.

    Heartbeats are long polls, as the real coordinator's: answers carry ``state``, and one
    whose ``state`` equals the query's ``since`` is held until the round changes or
    ``wait_secs`` (at most ``max_hold``) pass. ``long_poll=False`` plays an older coordinator:
    no ``state``, query ignored, answered at once. ``hold=False`` returns ``state`` but never
    holds (a server or proxy that does not wait).
    """

    rounds: int = 2
    heartbeat_period: float = 0.02
    # Heartbeat numbers (1-based, over all participants) answered in special ways.
    reject_heartbeats: set[int] = field(default_factory=set)
    forget_heartbeats: set[int] = field(default_factory=set)  # 404 unknown_participant
    drop_heartbeats: set[int] = field(default_factory=set)  # connection closed, no answer
    upload_errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    # Upload requests (1-based, over all of them) read whole and then left unanswered, the
    # connection closed; with `accept_dropped`, accepted first (the answer is what is lost).
    drop_uploads: set[int] = field(default_factory=set)
    accept_dropped: bool = False
    close_on_drop: bool = False  # a dropped upload not accepted closes its round at once
    expire_tokens: bool = False  # an upload for a closed round: 401 token_expired
    busy_uploads: set[int] = field(default_factory=set)  # answered 409 upload_in_progress
    join_error: tuple[int, str] | None = None
    linger: int = 3
    long_poll: bool = True
    hold: bool = True
    max_hold: float = 2.0
    # How the model download is framed: "length" (Content-Length), "chunked", or "close"
    # (neither: the body ends when the connection closes).
    model_transfer: str = "length"
    truncate_downloads: set[int] = field(default_factory=set)  # rounds: send half, then close

    # Recorded traffic.
    joins: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[tuple[float, str]] = field(default_factory=list)
    # One per heartbeat, in arrival order: {"pid", "query" (the query parameters), "state"
    # (of the answer; None when there was none, or not answered yet)}.
    heartbeat_log: list[dict[str, Any]] = field(default_factory=list)
    start_trainings: list[tuple[str, int]] = field(default_factory=list)
    downloads: list[int] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    upload_requests: list[tuple[int, str]] = field(default_factory=list)  # (round, pid), all
    accepted: set[tuple[int, str]] = field(default_factory=set)

    port: int = 0
    scheme: str = "http"  # "https" when served over TLS
    round: int = 0
    refused_heartbeats_left: int | None = None
    global_model: Weights | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, tuple[str, int]] = field(default_factory=dict)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)  # held heartbeats wait on it

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

    def heartbeat(self, pid: str, query: dict[str, str]) -> tuple[int, Any] | None:
        self.heartbeats.append((time.monotonic(), pid))
        entry: dict[str, Any] = {"pid": pid, "query": query, "state": None}
        self.heartbeat_log.append(entry)
        n = len(self.heartbeats)
        if n in self.drop_heartbeats:
            return None
        if n in self.forget_heartbeats:
            self.secrets.pop(pid, None)
        if pid not in self.secrets:
            return _error(404, "unknown_participant", f"no participant with id {pid}")
        if n in self.reject_heartbeats:
            del self.secrets[pid]
            answer = {"action": "rejected", "round": None, "attempt": None}
            return self._answer_heartbeat(entry, {**answer, "reason": "heartbeat timeout"})
        try:
            wait = float(query.get("wait_secs", "0"))
        except ValueError:
            wait = -1.0
        if self.long_poll and not wait >= 0:
            return _error(400, "invalid_query", "`wait_secs` must be a non-negative number")
        if self.refused_heartbeats_left is not None:
            self.refused_heartbeats_left -= 1
            if self.refused_heartbeats_left <= 0:  # the round closes without this update
                self.refused_heartbeats_left = None
                self.round += 1
                self.changed.notify_all()
        answer = self._action()
        if self.long_poll and self.hold:
            # Like the coordinator, which caps holds at half its heartbeat timeout: here the
            # period, so that these tests see about one heartbeat per period.
            deadline = time.monotonic() + min(wait, self.max_hold, self.heartbeat_period)
            while _state(answer) == query.get("since"):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)  # releases the lock meanwhile
                answer = self._action()
        return self._answer_heartbeat(entry, answer)

    def _action(self) -> dict[str, Any]:
        if self.round > self.rounds:
            return {"action": "finish", "round": None, "attempt": None, "reason": None}
        return {"action": "train", "round": self.round, "attempt": 0, "reason": None}

    def _answer_heartbeat(self, entry: dict[str, Any], answer: dict[str, Any]) -> tuple[int, Any]:
        if self.long_poll:
            entry["state"] = _state(answer)
            answer = {**answer, "state": entry["state"]}
        return 200, answer

    def start_training(self, pid: str) -> tuple[int, Any]:
        self.start_trainings.append((pid, self.round))
        if self.round > self.rounds or (self.round, pid) in self.accepted:
            # As the coordinator: nothing to train once finished, or once delivered.
            return _error(409, "not_selected", f"{pid} is not selected for an open round")
        token = f"token-{pid}-{self.round}"
        self.tokens[token] = (pid, self.round)
        return 200, {
            "round": self.round,
            "model_url": None if self.round == 0 else f"{self.url}/v1/rounds/{self.round}/model",
            "upload_url": f"{self.url}/v1/rounds/{self.round}/update",
            "token": token,
        }

    def model(self, r: int) -> bytes:
        self.downloads.append(r)
        assert self.global_model is not None
        if r in self.truncate_downloads and self.refused_heartbeats_left is None:
            # No update will come (each try of the round is cut short too): close later.
            self.refused_heartbeats_left = self.linger
        return encode(self.global_model, {"rondo.round": str(r - 1)})

    def update(self, r: int, pid: str, body: bytes, chunked: bool) -> tuple[int, Any] | None:
        self.upload_requests.append((r, pid))
        if self.expire_tokens and r != self.round:
            return _error(401, "token_expired")
        if (r, pid) in self.accepted:  # as the aggregator: one update per token
            return _error(409, "duplicate_update")
        if len(self.upload_requests) in self.busy_uploads:
            if self.refused_heartbeats_left is None:
                self.refused_heartbeats_left = self.linger  # if no retry comes, close later
            return _error(409, "upload_in_progress")
        if len(self.upload_requests) in self.drop_uploads:
            if self.accept_dropped:
                self.update_accepted(r, pid, body, chunked)
            elif self.close_on_drop:
                self.round += 1
                self.changed.notify_all()
            elif self.refused_heartbeats_left is None:
                self.refused_heartbeats_left = self.linger  # if no retry comes, close later
            return None
        self.refused_heartbeats_left = None
        return self.update_accepted(r, pid, body, chunked)

    def update_accepted(self, r: int, pid: str, body: bytes, chunked: bool) -> tuple[int, Any]:
        if r in self.upload_errors:
            self.refused_heartbeats_left = self.linger
            return _error(*self.upload_errors[r])
        weights, metadata = decode(body)
        self.accepted.add((r, pid))
        self.uploads.append(Upload(r, pid, weights, metadata, chunked))
        self.global_model = weights
        self.round += 1
        self.changed.notify_all()
        return 200, {"accepted": True, "round": r, "participant_id": pid, "n_samples": 1}

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def _state(answer: dict[str, Any]) -> str:
    """The real coordinator's `state` token for a heartbeat answer."""
    if answer["action"] == "train":
        return f"train:{answer['round']}:{answer['attempt']}"
    return str(answer["action"])


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

        def _send_model(self, data: bytes, truncate: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if fake.model_transfer == "length" or truncate:
                self.send_header("Content-Length", str(len(data)))
            elif fake.model_transfer == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                assert fake.model_transfer == "close", fake.model_transfer
                self.send_header("Connection", "close")
            self.end_headers()
            if truncate:
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            elif fake.model_transfer == "chunked":
                for start in range(0, len(data), 100):
                    piece = data[start : start + 100]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(data)
                self.close_connection = fake.model_transfer == "close"

        def do_POST(self) -> None:
            body, chunked = self._body()
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            parts = url.path.strip("/").split("/")
            with fake.lock:
                if parts == ["v1", "participants"]:
                    return self._answer(fake.join(json.loads(body) if body else {}))
                if parts[:2] == ["v1", "participants"] and len(parts) == 4:
                    pid = parts[2]
                    if pid in fake.secrets and self._bearer() != fake.secrets[pid]:
                        return self._answer(_error(401, "invalid_secret"))
                    if parts[3] == "heartbeat":
                        return self._answer(fake.heartbeat(pid, query))
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
                if parts == ["v1", "status"]:  # the coordinator's, reduced to its history
                    rounds = sorted({r for r, _ in fake.accepted})
                    history = [
                        {"round": r, "delivered": [p for q, p in fake.accepted if q == r]}
                        for r in rounds
                    ]
                    return self._answer((200, {"history": history}))
                if parts[:2] == ["v1", "rounds"] and parts[3] == "model":
                    r = int(parts[2])
                    if fake.tokens.get(self._bearer(), ("", -1))[1] != r:
                        return self._answer(_error(401, "invalid_token"))
                    data = fake.model(r)
                    return self._send_model(data, truncate=r in fake.truncate_downloads)
            self._answer(_error(404, "not_found"))

    return Handler


class TlsServer(ThreadingHTTPServer):
    """An HTTPS server; each connection's TLS handshake is made in the connection's thread.
    ``handshake_failures`` records the handshakes that failed."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.handshake_failures: list[BaseException] = []

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_failures.append(exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeRondo]]:
    """Factory: ``serve(port=0, tls=None, **fake_options)`` starts a FakeRondo (over TLS with
    ``tls``, a server SSLContext) and returns it."""
    servers: list[ThreadingHTTPServer] = []

    def start(port: int = 0, tls: ssl.SSLContext | None = None, **options: Any) -> FakeRondo:
        fake = FakeRondo(**options)
        if tls is None:
            server = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
        else:
            server = TlsServer(("127.0.0.1", port), _handler(fake), tls)
            fake.scheme = "https"
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
