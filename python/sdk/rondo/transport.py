"""HTTP/1.1 for the SDK, on the standard library's :mod:`http.client`.

A participant moves the whole model twice a round, and many participants may share one
process. ``requests`` (through urllib3) copies every downloaded chunk once more and spends about
a millisecond of Python per call on proxy, ``.netrc`` and hook handling; with ten participants
of a 10 MB model in one process that was half of a round. Here a download is read straight into
its final buffer (``readinto``), an upload goes to the socket piece by piece from the arrays'
own memory, and each origin keeps one persistent connection with ``TCP_NODELAY`` (so a small
request is never held back waiting for an acknowledgement).

One :class:`HttpClient` serves one thread at a time: the runner gives the heartbeat thread a
client of its own. Every answer of 400 or more becomes an :class:`~rondo.errors.ApiError`; every
failure to reach a service or to finish an exchange with it, a :class:`~rondo.errors.NetworkError`.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import numpy as np

from .errors import ApiError, NetworkError

DOWNLOAD_CHUNK_BYTES = 1 << 22
"""Bytes read at a time from a download of unknown length."""

# Failures of a kept-alive connection that the server closed while it sat idle: the request
# never reached it, so one that can be sent again is, once, on a fresh connection.
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


class SizedPieces(Protocol):
    """An upload body: its total length, and its pieces in order (bytes or memoryviews)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Any: ...


class _NoDelay:
    """Mixed into the connection classes: disable Nagle's algorithm on every new socket."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        assert self.sock is not None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPConnection(_NoDelay, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    pass


def _error_from(status: int, body: bytes) -> ApiError:
    """The documented ``{"error": {"code", "message"}}`` body as an ApiError; any other body
    gets the code ``http_<status>``."""
    code, message = f"http_{status}", body[:500].decode("utf-8", "replace")
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        pass  # not the documented shape (e.g. a proxy's page): keep the generic code
    return ApiError(status, code, message)


class HttpClient:
    """Persistent HTTP connections to the Rondo services, for one thread.

    Args:
        connect_timeout: seconds to wait for a TCP (and TLS) connection to open.
    """

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._connections: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

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
        response = self._exchange(method, url, all_headers, data, timeout)
        payload = self._read_all(response, method, url)
        if response.status >= 400:
            raise _error_from(response.status, payload)
        return json.loads(payload) if payload else None

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
        no chunk list, no join, no second copy of a possibly-gigabyte model. The new buffer is
        numpy's, left uninitialised: numpy asks the kernel for huge pages for large arrays, so
        the first write into it costs a few page faults rather than one per 4 KiB, and nothing
        is zeroed only to be overwritten. Bodies of unknown length (chunked, or ended by
        closing the connection) are appended to a growing buffer.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the connection failed or closed before the whole body came.
        """
        response = self._exchange("GET", url, dict(headers or {}), None, timeout)
        if response.status >= 400:
            raise _error_from(response.status, self._read_all(response, "GET", url))
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity"):
            self._forget(url)
            raise NetworkError(f"download of {url} came with Content-Encoding {encoding!r}")
        total = response.length  # None when chunked or delimited by closing the connection
        received = 0
        try:
            if total is None:
                grown = bytearray()
                while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                    grown += chunk
                return np.frombuffer(grown, np.uint8)
            fits = into is not None and into.shape == (total,) and into.dtype == np.uint8
            buffer = into if fits else np.empty(total, np.uint8)
            with memoryview(buffer) as view:
                while received < total:
                    n = response.readinto(view[received:])
                    if not n:
                        break
                    received += n
        except (OSError, http.client.HTTPException) as exc:
            self._forget(url)
            raise NetworkError(
                f"download of {url} failed after {received} of {total} bytes: {exc}"
            ) from exc
        if received < total:
            self._forget(url)
            raise NetworkError(
                f"download of {url} ended early: the connection closed after {received} of "
                f"{total} bytes (Content-Length)"
            )
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
        response = self._exchange("POST", url, all_headers, pieces, timeout)
        payload = self._read_all(response, "POST", url)
        if response.status >= 400:
            raise _error_from(response.status, payload)
        return json.loads(payload) if payload else None

    # --- connections ------------------------------------------------------------------------

    def _connection(self, url: str) -> tuple[http.client.HTTPConnection, str, bool]:
        """The origin's connection, the request target, and whether it was used before."""
        key, target = _origin(url)
        connection = self._connections.get(key)
        reused = connection is not None and connection.sock is not None
        if connection is not None and reused and _closed_by_peer(connection.sock):
            connection.close()
            reused = False
        if connection is None:
            scheme, host, port = key
            kind = _HTTPSConnection if scheme == "https" else _HTTPConnection
            connection = kind(host, port, timeout=self.connect_timeout)
            self._connections[key] = connection
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
    ) -> http.client.HTTPResponse:
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
        except (OSError, http.client.HTTPException) as exc:
            self._forget(url)
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            raise NetworkError(f"{method} {url} {what}") from exc

    def _send(
        self,
        connection: http.client.HTTPConnection,
        target: str,
        method: str,
        headers: dict[str, str],
        body: bytes | SizedPieces | None,
        timeout: float,
    ) -> http.client.HTTPResponse:
        if connection.sock is None:
            connection.timeout = min(self.connect_timeout, timeout)
            connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(timeout)
        # http.client adds `Accept-Encoding: identity`: downloads are read as sent, in place.
        connection.putrequest(method, target)
        for name, value in headers.items():
            connection.putheader(name, value)
        if isinstance(body, bytes):
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
        elif body is None:
            if method in ("POST", "PUT", "PATCH"):
                connection.putheader("Content-Length", "0")
            connection.endheaders()
        else:
            connection.endheaders()
            try:
                for piece in _pieces(body):
                    connection.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered (a refusal) and closed without reading the rest.
                pass
        return connection.getresponse()

    @staticmethod
    def _read_all(response: http.client.HTTPResponse, method: str, url: str) -> bytes:
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
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


def _closed_by_peer(sock: socket.socket | None) -> bool:
    """Whether an idle kept-alive socket became readable: the server closed it (or broke the
    protocol by talking unasked); either way it cannot carry the next request."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
