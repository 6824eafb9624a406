"""The SDK's transport against the real services: a whole federation through an HTTP proxy
named by the environment, and uploads whose answer (or whole request) the proxy loses.

The SDK's transport never sends an upload twice by itself; its runner does, after a network
failure, relying on the aggregator to take one update per token. Here that is checked against
the real aggregator: when the first attempt did get in, the retry is refused as
``duplicate_update``, the runner counts the round as delivered, and the update is averaged once.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from test_rounds import Adder, expected_value, final_model, run_in_thread


class ForwardingProxy(ThreadingHTTPServer):
    """An HTTP proxy for absolute-form requests, forwarding each with http.client.

    ``lose`` maps the number of an upload (1-based, ``POST .../update`` requests in arrival
    order) to what happens to it: ``"answer"``, forwarded and its answer lost; ``"request"``,
    read but never forwarded. Either way the participant's connection is reset instead of
    answered. ``requests`` records (method, absolute URL, status or the loss, Authorization).
    """

    daemon_threads = True

    def __init__(self, lose: dict[int, str] | None = None) -> None:
        self.lose = lose or {}
        self.requests: list[tuple[str, str, int | str, str | None]] = []
        self.uploads = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _proxy_handler(self))
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _proxy_handler(proxy: ForwardingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            target = urlsplit(self.path)
            fate = None
            if self.command == "POST" and target.path.endswith("/update"):
                with proxy.lock:
                    proxy.uploads += 1
                    fate = proxy.lose.get(proxy.uploads)
            if fate == "request":
                return self._reset(f"lost request ({len(body)} bytes)")
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy")}
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request(self.command, path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            if fate == "answer":
                return self._reset(f"lost answer {answer.status}")
            self._record(answer.status)
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET

        def _record(self, what: int | str) -> None:
            with proxy.lock:
                proxy.requests.append(
                    (self.command, self.path, what, self.headers["Authorization"])
                )

        def _reset(self, what: str) -> None:
            self._record(what)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch):
    """``proxy_env(lose=...)``: starts a ForwardingProxy and names it in HTTP_PROXY."""
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxies: list[ForwardingProxy] = []

    def start(lose: dict[int, str] | None = None) -> ForwardingProxy:
        proxy = ForwardingProxy(lose)
        proxies.append(proxy)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)  # the fixtures' status calls use it too
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def run_federation(start_federation, people: dict[str, Adder], rounds: int = 3) -> tuple:
    federation = start_federation(
        coordinator={
            "federation.rounds": rounds,
            "federation.min_clients": len(people),
            "federation.heartbeat_period_secs": 0.2,
            "federation.heartbeat_timeout_secs": 5,
        }
    )
    reports: dict = {}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    for thread in threads:
        thread.join(timeout=10)
    return federation, status, reports


def test_a_federation_through_an_http_proxy(start_federation, proxy_env) -> None:
    proxy = proxy_env()
    people = {"a": Adder(1.0, 10), "b": Adder(3.0, 30)}
    federation, status, reports = run_federation(start_federation, people)
    assert {r.final_action for r in reports.values()} == {"finish"}
    assert all(r.rejected_uploads == {} for r in reports.values())
    urls = [url for _, url, _, _ in proxy.requests]
    for path in ("/v1/participants", "/heartbeat", "/start_training", "/model", "/update"):
        assert any(path in url for url in urls), path
    assert {urlsplit(url).netloc for url in urls} == {
        federation.coordinator.addresses["api"],
        federation.aggregator.addresses["api"],
    }
    model = final_model(federation)
    for array in model.values():
        np.testing.assert_allclose(array, expected_value(status, people), rtol=1e-6)


@pytest.mark.parametrize(
    ("lost", "others_train_secs", "retry_answer"),
    [
        ("request", 0.0, 200),  # it never got in: the retry is taken
        ("answer", 1.5, 409),  # it got in, the round is still open: duplicate_update
        ("answer", 0.0, 401),  # it got in, the round closed at once: token_expired
    ],
)
def test_an_upload_lost_on_the_way_is_sent_again_and_counted_once(
    start_federation, proxy_env, lost: str, others_train_secs: float, retry_answer: int
) -> None:
    """Upload 2 is the first of round 1 (upload 1 is round 0's initial model): its answer (the
    update is in) or the request itself (it is not) is lost, the participant's connection
    reset. The runner sends it again, and whatever the aggregator answers (it takes it; it
    refuses a copy of an update it has; the round closed meanwhile, and the coordinator's
    history says the update was in), the round has both updates, once each, and the
    participant's report says it delivered."""
    proxy = proxy_env(lose={2: lost})
    people = {"a": Adder(1.0, 10), "b": Adder(3.0, 30, train_secs=others_train_secs)}
    if others_train_secs:  # so that a's upload is the first of round 1
        people["c"] = Adder(-2.0, 20, train_secs=others_train_secs)
    federation, status, reports = run_federation(start_federation, people)

    assert {r.final_action for r in reports.values()} == {"finish"}
    assert all(r.rejected_uploads == {} for r in reports.values()), reports
    assert all(r.rounds_trained[-3:] == [1, 2, 3] for r in reports.values()), reports
    uploads = [(url, what, token) for _, url, what, token in proxy.requests if "/update" in url]
    assert len(uploads) == 1 + 3 * len(people) + 1
    url, what, token = uploads[1]
    assert url.endswith("/v1/rounds/1/update") and str(what).startswith(f"lost {lost}")
    (retry,) = [what for _, what, t in uploads[2:] if t == token]  # same update, sent again
    assert retry == retry_answer
    history = {e["round"]: e for e in status["history"]}
    assert all(len(history[r]["delivered"]) == len(people) for r in (1, 2, 3))
    model = final_model(federation)
    for array in model.values():
        np.testing.assert_allclose(array, expected_value(status, people), rtol=1e-6)
