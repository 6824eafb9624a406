"""rondo.transport against small scripted HTTP servers on loopback ports."""

from __future__ import annotations

import json
import os
import socket
import struct
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
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ]
    )

    def handle(h: BaseHTTPRequestHandler) -> None:
        raw(h, next(answers), close=True)

    url = server(handle)
    with HttpClient() as http:
        for _ in range(7):
            with pytest.raises(NetworkError):
                http.call("GET", url, timeout=5)
        assert http.call("GET", url, timeout=5) == {}  # and the client recovers


def test_header_names_match_in_any_case_and_folded_values_are_joined(server) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        raw(
            h,
            b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 8\r\nX-Folded: a\r\n  b\r\n"
            b'TRANSFER-encoding: identity\r\n\r\n{"a": 1}',
        )

    url = server(handle)
    with HttpClient() as http:
        assert http.call("GET", url, timeout=5) == {"a": 1}
        connection, response = http._exchange("GET", url, {}, None, 5, True)
        assert response.getheader("x-folded") == "a b"
        assert response.getheader("Content-Length") == "8" and response.length == 8
        assert not response.chunked and not response.will_close
        assert response.read() == b'{"a": 1}'


# --- regressions of Rondo issue 9: what the hand-written client got wrong ----------------------


class RawServer:
    """A loopback HTTP/1.1 server on plain sockets, scripted per request.

    ``answer(n, conn, method, target, body)`` is called for the ``n``-th request (1-based, over
    all connections) once it has been read whole; it returns the bytes to answer with, those
    bytes in a tuple to close the connection after them, or None to close it there without
    answering (with a reset when ``reset`` is True).
    ``received`` records every request read: (connection number, method, target, body).
    """

    def __init__(self, answer: Callable[..., bytes | None], reset: bool = True) -> None:
        self.answer = answer
        self.reset = reset
        self.received: list[tuple[int, str, str, bytes]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        reader = sock.makefile("rb")
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = reader.read(length)
                with self.lock:
                    self.received.append((number, method, target, body))
                    n = len(self.received)
                answer = self.answer(n, number, method, target, body)
                if answer is None:
                    if self.reset:  # SO_LINGER 0: close with a reset, as a crashed server does
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
                    return
                if isinstance(answer, tuple):  # (answer, "then close"): a graceful close
                    sock.sendall(answer[0])
                    return
                sock.sendall(answer)
        except OSError:
            return
        finally:
            reader.close()
            sock.close()

    def close(self) -> None:
        self.listener.close()

    def bodies(self) -> list[bytes]:
        return [body for _, _, _, body in self.received]


LINGER_0 = struct.pack("ii", 1, 0)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


class Pieces:
    """An upload body in two pieces, one a memoryview."""

    def __init__(self, text: bytes) -> None:
        self.text = text

    def __len__(self) -> int:
        return len(self.text)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield self.text[:3]
        yield memoryview(bytearray(self.text[3:]))


@pytest.mark.parametrize("kind", ["call", "upload"])
def test_a_post_is_never_sent_twice_when_the_server_drops_it(kind: str) -> None:
    """The server answers one request on a kept-alive connection, reads the next POST whole
    and resets the connection without answering (a crash, or an idle timeout racing with the
    request): whether it acted on that POST is unknown, so the client must not send it again
    by itself. (The hand-written client took the reset for an idle close and sent it again.)"""
    server = RawServer(lambda n, *_: OK if n == 1 else None)
    try:
        with HttpClient() as http:
            assert http.call("POST", f"{server.url}/join", body={"n": 1}, timeout=5) == {}
            with pytest.raises(NetworkError):
                if kind == "call":
                    http.call("POST", f"{server.url}/join", body={"n": 2}, timeout=5)
                else:
                    http.upload(f"{server.url}/update", Pieces(b"update-2"), timeout=5)
            time.sleep(0.2)  # anything sent again would have arrived by now
        second = b'{"n": 2}' if kind == "call" else b"update-2"
        assert server.bodies() == [b'{"n": 1}', second]
        assert server.connections == 1
    finally:
        server.close()


@pytest.mark.parametrize("reset", [True, False])
def test_an_idempotent_request_is_sent_again_on_a_fresh_connection(reset: bool) -> None:
    """The same failure for a GET, or a POST declared idempotent (a heartbeat): sent once more,
    on a new connection, and the caller never sees the stale one."""
    server = RawServer(lambda n, *_: None if n in (2, 4) else OK, reset=reset)
    try:
        with HttpClient() as http:
            assert http.call("GET", f"{server.url}/a", timeout=5) == {}
            assert http.call("GET", f"{server.url}/b", timeout=5) == {}  # 2 dropped, 3 answered
            assert http.call("POST", f"{server.url}/hb", idempotent=True, timeout=5) == {}
        assert [(c, t) for c, _, t, _ in server.received] == [
            (1, "/a"),
            (1, "/b"),
            (2, "/b"),
            (2, "/hb"),
            (3, "/hb"),
        ]
    finally:
        server.close()


def test_a_connection_closed_while_idle_is_not_used_for_a_post() -> None:
    """An idle close that reached the client before its next request (the usual case: a
    server's keep-alive timeout) is noticed before anything is sent: the POST goes, once, on a
    fresh connection."""
    server = RawServer(lambda n, *_: (OK, "then close") if n == 1 else OK)
    try:
        with HttpClient() as http:
            assert http.call("POST", f"{server.url}/x", body={"n": 1}, timeout=5) == {}
            time.sleep(0.1)  # the close reaches the client while its connection sits idle
            assert http.call("POST", f"{server.url}/x", body={"n": 2}, timeout=5) == {}
        assert server.bodies() == [b'{"n": 1}', b'{"n": 2}']
        assert server.connections == 2
    finally:
        server.close()


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Holds every file descriptor up to above 1023, so that the next socket gets a larger
    one (raising the soft RLIMIT_NOFILE when it is lower)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    held: list[int] = []
    try:
        while not held or held[-1] <= 1040:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_are_reused_above_file_descriptor_1023(server, high_fds) -> None:
    """select() cannot watch a descriptor above 1023 (FD_SETSIZE): the hand-written client then
    took every kept-alive connection for closed and opened a new one per request."""
    peers: list[tuple[str, int]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        read_request_body(h)
        reply(h, 200, b'{"ok": 1}')

    url = server(handle)
    with socket.socket() as probe:
        assert probe.fileno() > 1023  # and so will the client's be
    with HttpClient() as http:
        assert http.call("GET", url, timeout=5) == {"ok": 1}
        assert http.call("POST", url, body={}, timeout=5) == {"ok": 1}
        assert bytes(http.download(url, timeout=5)) == b'{"ok": 1}'
    assert len(peers) == 3 and len(set(peers)) == 1


def test_chunked_answers_with_bare_lf_line_endings(server) -> None:
    """RFC 9112 lets a recipient take a bare LF for a line's end; the hand-written client (and
    http.client itself) expected CRLF after each chunk's data."""
    peers: list[tuple[str, int]] = []
    bare = (
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n"
        b'5;ext=1\n{"a":\n3\n 1}\n0\nX-Trailer: t\n\n'
    )
    long_chunk = b'b": "' + b"x" * 20000 + b'"}'
    mixed = (  # CRLF and LF in one answer, and one long chunk
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'2\r\n{"\n' + b"%x\n" % len(long_chunk) + long_chunk + b"\r\n0\r\n\r\n"
    )
    answers = iter([bare, bare, mixed, bare])

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        raw(h, next(answers))

    url = server(handle)
    with HttpClient() as http:
        assert http.call("GET", url, timeout=5) == {"a": 1}
        data = http.download(url, timeout=5)
        assert data.flags.writeable and bytes(data) == b'{"a": 1}'
        assert http.call("GET", url, timeout=5) == {"b": "x" * 20000}
        assert http.call("GET", url, timeout=5) == {"a": 1}
    assert len(set(peers)) == 1  # each answer read to its end: the connection stays usable


def test_empty_answers_leave_the_connection_usable(server) -> None:
    peers: list[tuple[str, int]] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        peers.append(h.client_address)
        reply(h, 204 if h.path == "/none" else 200, b"")

    url = server(handle)
    with HttpClient() as http:
        assert http.call("POST", f"{url}/none", timeout=5) is None
        assert http.call("GET", url, timeout=5) is None
        assert len(http.download(url, timeout=5)) == 0
    assert len(peers) == 3 and len(set(peers)) == 1


def test_one_client_serves_several_threads(server) -> None:
    """The runner's heartbeat thread and main thread share a client: a long poll in one
    thread does not hold up, or mix with, the other's requests."""
    release = threading.Event()

    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/hold":
            release.wait(5)
        reply(h, 200, json.dumps({"path": h.path}).encode())

    url = server(handle)
    with HttpClient() as http:
        held: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: held.update(answer=http.call("GET", f"{url}/hold", timeout=10))
        )
        thread.start()
        time.sleep(0.1)
        for k in range(5):
            assert http.call("GET", f"{url}/{k}", timeout=5) == {"path": f"/{k}"}
        release.set()
        thread.join(5)
        assert held["answer"] == {"path": "/hold"}


def test_plain_http_to_another_host_is_warned_about_once(monkeypatch, caplog) -> None:
    import rondo.transport as transport

    monkeypatch.setattr(transport, "_warned", set())
    refused = ConnectionRefusedError("refused by the test")

    def create_connection(*args: Any, **kwargs: Any) -> socket.socket:
        raise refused

    monkeypatch.setattr(socket, "create_connection", create_connection)
    with caplog.at_level("WARNING", logger="rondo"), HttpClient() as http:
        for url in ["http://rondo.example:8081/a", "http://rondo.example:8081/b"]:
            with pytest.raises(NetworkError, match="refused by the test"):
                http.call("GET", url, timeout=1)
        for url in ["http://127.0.0.1:1/", "http://localhost:1/", "http://[::1]:1/"]:
            with pytest.raises(NetworkError):
                http.call("GET", url, timeout=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "http://rondo.example:8081" in warnings[0] and "TLS" in warnings[0]
