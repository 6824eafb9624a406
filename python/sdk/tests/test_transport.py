"""rondo.transport against small scripted HTTP servers on loopback ports."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rondo import ApiError, NetworkError
from rondo.transport import HttpClient

Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def server() -> Iterator[Callable[[Handler], str]]:
    """Factory: ``server(handle)`` serves every request with ``handle``; returns the base URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(handle: Handler) -> str:
        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                handle(self)

            do_POST = do_GET

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, close: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    if close:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    return handler.rfile.read(int(handler.headers.get("Content-Length", 0)))


def test_call_sends_json_and_parses_the_answer(server) -> None:
    seen: list[tuple[str, str, Any, str | None]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        body = read_request_body(h)
        seen.append((h.command, h.path, json.loads(body) if body else None, h.headers["X-A"]))
        reply(h, 200, b'{"ok": true}')

    url = server(handle)
    with HttpClient() as http:
        assert http.call("POST", f"{url}/a", body={"x": 1}, headers={"X-A": "b"}, timeout=5) == {
            "ok": True
        }
        assert http.call("POST", f"{url}/b", params={"wait_secs": 0.5}, timeout=5) == {"ok": True}
    assert seen == [("POST", "/a", {"x": 1}, "b"), ("POST", "/b?wait_secs=0.5", None, None)]


def test_error_answers_become_api_errors(server) -> None:
    answers = iter(
        [
            (409, b'{"error": {"code": "duplicate_update", "message": "already in"}}'),
            (502, b"<html>bad gateway</html>"),
        ]
    )

    def handle(h: BaseHTTPRequestHandler) -> None:
        read_request_body(h)
        reply(h, *next(answers))

    url = server(handle)
    with HttpClient() as http:
        with pytest.raises(ApiError) as info:
            http.call("POST", url, timeout=5)
        assert (info.value.status, info.value.code, info.value.message) == (
            409,
            "duplicate_update",
            "already in",
        )
        with pytest.raises(ApiError) as info:
            http.call("GET", url, timeout=5)
        assert (info.value.status, info.value.code) == (502, "http_502")
        assert "bad gateway" in info.value.message


def test_connections_are_kept_alive(server) -> None:
    peers: list[tuple[str, int]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        reply(h, 200, b"{}")

    url = server(handle)
    with HttpClient() as http:
        for _ in range(3):
            http.call("GET", url, timeout=5)
    assert len(peers) == 3 and len(set(peers)) == 1


def test_a_connection_the_server_closed_is_replaced(server) -> None:
    peers: list[tuple[str, int]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        # Claims keep-alive, then closes anyway: as a server does after its idle timeout.
        reply(h, 200, b"{}")
        h.close_connection = True

    url = server(handle)
    with HttpClient() as http:
        http.call("GET", url, timeout=5)
        time.sleep(0.1)  # the close reaches the client while its connection sits idle
        assert http.call("GET", url, timeout=5) == {}
    assert len(set(peers)) == 2


def test_download_reads_into_the_given_buffer_when_it_fits(server) -> None:
    payloads = iter([b"abcdefgh", b"ABCDEFGH", b"0123456789"])

    def handle(h: BaseHTTPRequestHandler) -> None:
        reply(h, 200, next(payloads))

    url = server(handle)
    with HttpClient() as http:
        first = http.download(url, timeout=5)
        assert first.flags.writeable and bytes(first) == b"abcdefgh"
        second = http.download(url, timeout=5, into=first)
        assert second is first and bytes(first) == b"ABCDEFGH"
        third = http.download(url, timeout=5, into=first)  # another size: a new buffer
        assert third is not first and bytes(third) == b"0123456789"
        assert bytes(first) == b"ABCDEFGH"


def test_download_cut_short_is_a_network_error(server) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        h.wfile.write(b"x" * 40)
        h.close_connection = True

    url = server(handle)
    with HttpClient() as http, pytest.raises(NetworkError, match=r"after 40 of 100 bytes"):
        http.download(url, timeout=5)


def test_upload_sends_every_piece_with_a_content_length(server) -> None:
    received: list[tuple[str | None, bytes]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        received.append((h.headers["Content-Length"], read_request_body(h)))
        reply(h, 200, b'{"accepted": true}')

    class Pieces:
        def __len__(self) -> int:
            return 11

        def __iter__(self) -> Iterator[bytes | memoryview]:
            yield b"head"
            yield memoryview(b"")  # empty pieces are skipped
            yield memoryview(bytearray(b"-body-!"))

    url = server(handle)
    with HttpClient() as http:
        assert http.upload(url, Pieces(), timeout=5) == {"accepted": True}
    assert received == [("11", b"head-body-!")]


def test_upload_refused_before_it_is_read_gives_the_refusal(server) -> None:
    """A service may answer a bad token at once and close without reading a large body."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        body = b'{"error": {"code": "invalid_token", "message": "no"}}'
        reply(h, 401, body, close=True)

    class Large:
        def __len__(self) -> int:
            return 64 << 20

        def __iter__(self) -> Iterator[bytes | memoryview]:
            chunk = memoryview(bytearray(1 << 20))
            for _ in range(64):
                yield chunk

    url = server(handle)
    with HttpClient() as http, pytest.raises(ApiError) as info:
        http.upload(url, Large(), timeout=10)
    assert (info.value.status, info.value.code) == (401, "invalid_token")


def test_unreachable_and_silent_services_are_network_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with HttpClient() as http, pytest.raises(NetworkError, match="failed"):
            http.call("GET", f"http://127.0.0.1:{port}/", timeout=5)  # bound, not listening
        sock.listen()  # accepts connections, never answers
        started = time.monotonic()
        with HttpClient() as http, pytest.raises(NetworkError, match="timed out"):
            http.call("GET", f"http://127.0.0.1:{port}/", timeout=0.3)
        assert time.monotonic() - started < 2.0


def test_bad_urls_are_network_errors() -> None:
    with HttpClient() as http:
        for url in ["ftp://example.org/", "http:///nohost", "http://127.0.0.1:notaport/"]:
            with pytest.raises(NetworkError):
                http.call("GET", url, timeout=1)


def test_requests_name_their_host_and_ask_for_bodies_as_they_are(server) -> None:
    """Without `Accept-Encoding: identity` a server or proxy may compress a download."""
    seen: list[tuple[str | None, str | None]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        seen.append((h.headers["Host"], h.headers["Accept-Encoding"]))
        reply(h, 200, b"{}")

    url = server(handle)
    with HttpClient() as http:
        http.call("GET", url, timeout=5)
        http.download(url, timeout=5)
    host = url.removeprefix("http://")
    assert seen == [(host, "identity"), (host, "identity")]


def raw(handler: BaseHTTPRequestHandler, answer: bytes, close: bool = False) -> None:
    """Writes ``answer`` as it is: for the framings the standard server does not produce."""
    handler.wfile.write(answer)
    handler.wfile.flush()
    handler.close_connection = close


def test_chunked_answers_are_read_whole(server) -> None:
    peers: list[tuple[str, int]] = []
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        raw(h, chunked)

    url = server(handle)
    with HttpClient() as http:
        assert http.call("GET", url, timeout=5) == {"a": 1}
        data = http.download(url, timeout=5)
        assert data.flags.writeable and bytes(data) == b'{"a": 1}'
        assert http.call("GET", url, timeout=5) == {"a": 1}
    assert len(set(peers)) == 1  # a chunked answer read to its end leaves the connection usable


def test_answers_ended_by_closing_the_connection(server) -> None:
    peers: list[tuple[str, int]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        if h.path == "/old":  # HTTP/1.0 with a length: the connection still ends after it
            raw(h, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", close=True)
        else:  # no length at all: the body is whatever comes until the close
            raw(h, b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"n": 2}', close=True)

    url = server(handle)
    with HttpClient() as http:
        assert http.call("GET", f"{url}/old", timeout=5) == {}
        assert http.call("GET", f"{url}/new", timeout=5) == {"n": 2}
        assert bytes(http.download(f"{url}/new", timeout=5)) == b'{"n": 2}'
    assert len(set(peers)) == 3


def test_an_interim_answer_is_skipped(server) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        read_request_body(h)
        raw(h, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")

    url = server(handle)
    with HttpClient() as http:
        assert http.call("POST", url, body={"x": 1}, timeout=5) == {}


def test_answers_that_are_not_http_are_network_errors(server) -> None:
    answers = iter(
        [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * 70000 + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ]
    )

    def handle(h: BaseHTTPRequestHandler) -> None:
        raw(h, next(answers), close=True)

    url = server(handle)
    with HttpClient() as http:
        for _ in range(4):
            with pytest.raises(NetworkError):
                http.call("GET", url, timeout=5)
        assert http.call("GET", url, timeout=5) == {}  # and the client recovers
