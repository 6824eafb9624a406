"""HTTP/1.1 for the SDK, on plain sockets.

A participant moves the whole model twice a round, and many participants may share one
process. Here a download is read straight off the socket into its final buffer, an upload goes
to the socket piece by piece from the arrays' own memory, and each origin keeps one persistent
connection with ``TCP_NODELAY`` (so a small request is never held back waiting for an
acknowledgement).

Why not a library: ``requests`` (through urllib3) copied every downloaded chunk once more and
spent about a millisecond of Python per call; with ten participants of a 10 MB model in one
process that was half of a round. The standard library's :mod:`http.client` avoids that, but
importing it (it brings :mod:`email` for header parsing, and :mod:`ssl`) took 33 ms on these
machines, a fifth of a participant's whole start-up, before the first request. What the SDK
needs of HTTP is small: requests with a ``Content-Length``, and answers framed by
``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the connection. That is
written out below (:class:`_Response`) and tested against the standard library's server;
:mod:`ssl` is imported only for an ``https`` URL.

One :class:`HttpClient` serves one thread at a time: the runner gives the heartbeat thread a
client of its own. Every answer of 400 or more becomes an :class:`~rondo.errors.ApiError`; every
failure to reach a service or to finish an exchange with it, a :class:`~rondo.errors.NetworkError`.
"""

from __future__ import annotations

import json
import mmap
import select
import socket
from collections.abc import Iterable, Mapping
from io import BufferedReader
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import numpy as np

from .errors import ApiError, NetworkError

READ_CHUNK_BYTES = 1 << 16
"""Bytes read at a time from an answer of unknown length (chunked, or ended by closing)."""

MAX_LINE_BYTES = 65536
"""Longest status line, header line or chunk-size line accepted in an answer."""

MAX_HEADERS = 100
"""Most header lines accepted in one answer."""


class _ProtocolError(Exception):
    """The service's answer is not HTTP/1.x as this client reads it."""


class _Stale(Exception):
    """A kept-alive connection turned out to be closed before any answer arrived."""


# Failures of a kept-alive connection that the server closed while it sat idle: the request
# never reached it, so one that can be sent again is, once, on a fresh connection.
_STALE_CONNECTION = (_Stale, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


class SizedPieces(Protocol):
    """An upload body: its total length, and its pieces in order (bytes or memoryviews)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Any: ...


def _error_from(status: int, body: bytes | bytearray) -> ApiError:
    """The documented ``{"error": {"code", "message"}}`` body as an ApiError; any other body
    gets the code ``http_<status>``."""
    code, message = f"http_{status}", body[:500].decode("utf-8", "replace")
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        pass  # not the documented shape (e.g. a proxy's page): keep the generic code
    return ApiError(status, code, message)


def _new_buffer(size: int) -> np.ndarray:
    """A writable ``uint8`` array of ``size`` bytes for a download to be read into.

    Private anonymous memory in 4 KiB pages, zeroed lazily by the kernel as the socket fills
    it. Not numpy's allocation: numpy asks for huge pages for large arrays, and on these
    machines ten participants of one process faulting in 2 MiB pages while their sockets fill
    made a federation's first round 20-40 ms slower than 4 KiB pages did (the kernel zeroes
    each huge page in one go, inside the receive call); with a process per participant the two
    are even. Private, because :class:`mmap.mmap` maps shared memory by default, which is
    slower to fault in and to free.
    """
    if size == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), np.uint8)


class _Response:
    """An answer's status and headers, and its body, read on demand from the connection."""

    def __init__(self, reader: BufferedReader, method: str) -> None:
        self._reader = reader
        self.status, version = self._read_status()
        self.headers = self._read_headers()
        connection = self.headers.get("connection", "").lower()
        # HTTP/1.1 keeps a connection unless told to close it; HTTP/1.0 only when asked to.
        self.will_close = "close" in connection or (
            version == "HTTP/1.0" and "keep-alive" not in connection
        )
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.length: int | None = None  # None: chunked, or until the connection closes
        self.received = 0  # body bytes read so far
        self._left_in_chunk = 0
        self.done = False
        if method == "HEAD" or self.status in (204, 304):
            self.length = 0
        elif not self.chunked and "content-length" in self.headers:
            try:
                self.length = int(self.headers["content-length"])
            except ValueError as exc:
                raise _ProtocolError(
                    f"bad Content-Length {self.headers['content-length']!r}"
                ) from exc
            if self.length < 0:
                raise _ProtocolError(f"bad Content-Length {self.length}")
        elif not self.chunked:
            self.will_close = True  # the body ends when the connection does
        if self.length == 0:
            self.done = True

    def _line(self) -> bytes:
        line = self._reader.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise _ProtocolError("a line of the answer is too long")
        return line

    def _read_status(self) -> tuple[int, str]:
        while True:
            line = self._line()
            if not line:
                raise _Stale("the connection closed before an answer")
            parts = line.decode("latin-1").rstrip("\r\n").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise _ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(parts[1])
            if not 100 <= status < 200:
                return status, parts[0]
            self._read_headers()  # an interim answer (100 Continue): the real one follows

    def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _ProtocolError(f"not a header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise _ProtocolError(f"more than {MAX_HEADERS} header lines")

    def readinto(self, view: memoryview) -> int:
        """Reads body bytes into ``view``; 0 once the body is complete."""
        if self.done or not len(view):
            return 0
        if self.chunked:
            if self._left_in_chunk == 0:
                self._left_in_chunk = self._next_chunk_size()
                if self._left_in_chunk == 0:
                    self._finish_chunked()
                    return 0
            view = view[: self._left_in_chunk]
        elif self.length is not None:
            view = view[: self.length - self.received]
        n = self._reader.readinto(view)
        if not n:
            if self.length is None and not self.chunked:
                self.done = True  # delimited by the end of the connection: that was it
                return 0
            raise ConnectionError("the connection closed in the middle of the answer")
        self.received += n
        if self.chunked:
            self._left_in_chunk -= n
            if self._left_in_chunk == 0 and self._reader.read(2) not in (b"\r\n", b"\n"):
                raise _ProtocolError("a chunk does not end with CRLF")
        elif self.length is not None:
            self.done = self.received == self.length
        return n

    def fill(self, view: memoryview) -> int:
        """Reads body bytes into ``view`` until it is full or the body is complete."""
        got = 0
        while got < len(view) and (n := self.readinto(view[got:])):
            got += n
        return got

    def _next_chunk_size(self) -> int:
        line = self._line()
        if not line:
            raise ConnectionError("the connection closed in the middle of the answer")
        size = line.split(b";", 1)[0].strip()
        try:
            return int(size, 16)
        except ValueError as exc:
            raise _ProtocolError(f"bad chunk size {size[:20]!r}") from exc

    def _finish_chunked(self) -> None:
        while self._line() not in (b"\r\n", b"\n", b""):
            pass  # trailers: none are used
        self.done = True

    def read(self) -> bytearray:
        """The whole (rest of the) body."""
        if self.length is not None:
            buffer = bytearray(self.length - self.received)
            with memoryview(buffer) as view:
                self.fill(view)
            return buffer
        parts = []
        chunk = bytearray(READ_CHUNK_BYTES)
        with memoryview(chunk) as view:
            while n := self.readinto(view):
                parts.append(bytes(view[:n]))
        return bytearray().join(parts)


class _Connection:
    """One persistent connection to an origin; ``sock`` is None while it is closed."""

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.sock: socket.socket | None = None
        self.reader: BufferedReader | None = None
        self.response: _Response | None = None  # the answer being read, if any
        default_port = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if port == default_port else f"{name}:{port}"

    def open(self, timeout: float) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                import ssl  # only when asked for: it costs ~15 ms to import

                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = sock.makefile("rb")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.reader = self.response = None

    def reusable(self) -> bool:
        """Whether the connection can carry the next request: open, its last answer read to
        the end, and not closed by the server meanwhile."""
        response = self.response
        if self.sock is None or (
            response is not None and (not response.done or response.will_close)
        ):
            return False
        return not _closed_by_peer(self.sock)


class HttpClient:
    """Persistent HTTP connections to the Rondo services, for one thread.

    Args:
        connect_timeout: seconds to wait for a TCP (and TLS) connection to open.
    """

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._connections: dict[tuple[str, str, int], _Connection] = {}

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the three kinds of exchange --------------------------------------------------------

    def call(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        params: Mapping[str, str | float] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """A JSON exchange: ``body`` (when not None) is sent as JSON; the answer is parsed.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the service could not be reached or the exchange broke off.
            ValueError: a successful answer was not JSON.
        """
        if params:
            url = f"{url}?{urlencode(params)}"
        all_headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        return self._json_answer(
            self._exchange(method, url, all_headers, data, timeout), method, url
        )

    def download(
        self,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        """GET ``url`` into a writable 1-D ``uint8`` array, read straight off the socket.

        With a ``Content-Length``, the body is read in place into ``into`` when it has exactly
        that size (its old contents are overwritten), else into one new buffer of that size:
        no chunk list, no join, no second copy of a possibly-gigabyte model. Bodies of unknown
        length (chunked, or ended by closing the connection) are gathered and then copied once.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the connection failed or closed before the whole body came.
        """
        response = self._exchange("GET", url, dict(headers or {}), None, timeout)
        if response.status >= 400:
            raise _error_from(response.status, self._read_all(response, "GET", url))
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self._forget(url)
            raise NetworkError(f"download of {url} came with Content-Encoding {encoding!r}")
        total = response.length
        if total is None:
            return np.frombuffer(self._read_all(response, "GET", url), np.uint8)
        fits = into is not None and into.shape == (total,) and into.dtype == np.uint8
        buffer = into if fits else _new_buffer(total)
        try:
            with memoryview(buffer) as view:
                response.fill(view)
        except (OSError, _ProtocolError) as exc:
            self._forget(url)
            raise NetworkError(
                f"download of {url} failed after {response.received} of {total} bytes: {exc}"
            ) from exc
        return buffer

    def upload(
        self,
        url: str,
        pieces: SizedPieces,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """POST ``pieces`` with a ``Content-Length`` of ``len(pieces)``, each piece handed to the
        socket as it is (memoryviews of arrays are not copied); the JSON answer, parsed.

        A service that refuses an upload may answer before reading it all and close the
        connection: its answer is still read and raised as the ApiError it is.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the service could not be reached or the exchange broke off.
        """
        all_headers = {**(headers or {}), "Content-Length": str(len(pieces))}
        return self._json_answer(
            self._exchange("POST", url, all_headers, pieces, timeout), "POST", url
        )

    # --- connections ------------------------------------------------------------------------

    def _connection(self, url: str) -> tuple[_Connection, str, bool]:
        """The origin's connection, the request target, and whether it was used before."""
        key, target = _origin(url)
        connection = self._connections.get(key)
        if connection is None:
            connection = self._connections[key] = _Connection(*key)
        reused = connection.sock is not None
        if reused and not connection.reusable():
            connection.close()
            reused = False
        return connection, target, reused

    def _forget(self, url: str) -> None:
        """Close the origin's connection: it is in an unknown state after a failure."""
        connection = self._connections.pop(_origin(url)[0], None)
        if connection is not None:
            connection.close()

    def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | SizedPieces | None,
        timeout: float,
    ) -> _Response:
        """Send a request and read the answer's status and headers (not its body)."""
        connection, target, reused = self._connection(url)
        try:
            try:
                return self._send(connection, target, method, headers, body, timeout)
            except _STALE_CONNECTION:
                if not reused:
                    raise
                connection.close()  # the server let it go while idle: once more, afresh
                return self._send(connection, target, method, headers, body, timeout)
        except (OSError, _ProtocolError, _Stale) as exc:
            self._forget(url)
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            raise NetworkError(f"{method} {url} {what}") from exc

    def _send(
        self,
        connection: _Connection,
        target: str,
        method: str,
        headers: dict[str, str],
        body: bytes | SizedPieces | None,
        timeout: float,
    ) -> _Response:
        if connection.sock is None:
            connection.open(min(self.connect_timeout, timeout))
        sock, reader = connection.sock, connection.reader
        assert sock is not None and reader is not None
        sock.settimeout(timeout)
        # `Accept-Encoding: identity`: downloads are read as sent, in place.
        lines = [f"{method} {target} HTTP/1.1", f"Host: {connection.host_header}"]
        lines.append("Accept-Encoding: identity")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if isinstance(body, bytes) or (body is None and method in ("POST", "PUT", "PATCH")):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        connection.response = None
        if isinstance(body, bytes):
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            if body is not None:
                try:
                    for piece in _pieces(body):
                        sock.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    # The server may have answered (a refusal) and closed without reading the
                    # rest: its answer is read below.
                    pass
        response = _Response(reader, method)
        connection.response = response
        return response

    def _json_answer(self, response: _Response, method: str, url: str) -> Any:
        """The answer's JSON body; an ApiError for a status of 400 or more."""
        payload = self._read_all(response, method, url)
        if response.status >= 400:
            raise _error_from(response.status, payload)
        return json.loads(payload) if payload else None

    def _read_all(self, response: _Response, method: str, url: str) -> bytearray:
        try:
            return response.read()
        except (OSError, _ProtocolError) as exc:
            self._forget(url)
            raise NetworkError(f"{method} {url}: reading the answer failed: {exc!r}") from exc


def _origin(url: str) -> tuple[tuple[str, str, int], str]:
    """(scheme, host, port) of ``url``, and its request target (path and query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkError(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise NetworkError(f"bad port in URL {url!r}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.scheme, parts.hostname, port), target


def _pieces(body: SizedPieces) -> Iterable[bytes | memoryview]:
    for piece in body:
        if len(piece):
            yield piece


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket became readable: the server closed it (or broke the
    protocol by talking unasked); either way it cannot carry the next request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
