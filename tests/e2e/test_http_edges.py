"""The edges of the HTTP contract that hyper meets before any handler: requests it cannot parse,
heads too large, bodies declared too large. Each gets the JSON error body that every Rondo API
promises, at once, on both services. Spoken over raw sockets, since an HTTP client would refuse
to send most of these."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

MAX_BODY = 4096
IDLE_TIMEOUT = 5


def exchange(address: str, request: bytes, timeout: float = 4.0) -> tuple[int, dict, bytes, float]:
    """Sends `request` and reads one answer; returns (status, headers, body, seconds taken)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        started = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer's head: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {name.lower(): value for name, value in headers.items()}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-body: {body!r}"
            body += chunk
        return int(lines[0].split()[1]), headers, body, time.monotonic() - started


def assert_json_error(answer, status: int, code: str) -> None:
    got, headers, body, _ = answer
    assert got == status, answer
    assert headers.get("content-type", "").startswith("application/json"), answer
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    assert error["message"], error


@pytest.fixture
def training(start_federation, tmp_path):
    """A federation in round 1 with one participant selected; returns (federation, ticket)."""
    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 1,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={
            "model.initial_model": initial,
            "api.max_body_bytes": MAX_BODY,
            "api.upload_idle_timeout_secs": IDLE_TIMEOUT,
        },
    )
    url = federation.coordinator_url
    joined = requests.post(f"{url}/v1/participants", json={"name": "p"}, timeout=5).json()
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    ticket = requests.post(
        f"{url}/v1/participants/{joined['participant_id']}/start_training",
        headers={"Authorization": f"Bearer {joined['secret']}"},
        timeout=5,
    ).json()
    return federation, ticket


SERVICES = ["coordinator", "aggregator"]


def address(federation, service: str) -> str:
    return getattr(federation, service).addresses["api"]


@pytest.mark.parametrize("service", SERVICES)
def test_a_garbage_request_line_gets_400_with_the_json_error(training, service):
    federation, _ = training
    assert_json_error(
        exchange(address(federation, service), b"GARBAGE\r\n\r\n"), 400, "bad_request"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_a_content_length_that_is_not_a_number_gets_400_with_the_json_error(training, service):
    federation, _ = training
    request = b"POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    assert_json_error(exchange(address(federation, service), request), 400, "bad_request")


@pytest.mark.parametrize("service", SERVICES)
def test_a_100_kb_header_gets_431_with_the_json_error(training, service):
    federation, _ = training
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer = exchange(address(federation, service), request)
    assert_json_error(answer, 431, "headers_too_large")


def test_a_coordinator_body_declared_too_large_is_refused_at_once(training):
    federation, _ = training
    # The body never comes: the answer must come from the head alone.
    request = b"POST /v1/participants HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    answer = exchange(address(federation, "coordinator"), request)
    assert_json_error(answer, 413, "invalid_body")
    assert answer[3] < 1.0, answer
    assert len(federation.status()["participants"]) == 1


def test_an_upload_declared_too_large_is_refused_at_once(training):
    federation, ticket = training
    path = "/" + ticket["upload_url"].split("/", 3)[3]
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ticket['token']}\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    # Without the check the aggregator waits for the body until the idle timeout (408).
    answer = exchange(address(federation, "aggregator"), request, timeout=IDLE_TIMEOUT + 3)
    assert_json_error(answer, 413, "body_too_large")
    assert answer[3] < 1.0, answer
    assert federation.aggregator_status()["accepted"] == []
