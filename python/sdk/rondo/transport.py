"""HTTP for the SDK, on the standard library's :mod:`http.client`.

A participant moves the whole model twice a round, and many participants may share one
process. Here a download is read straight off the connection into its final buffer, an upload
goes to the socket piece by piece from the arrays' own memory, and connections are kept alive
and reused (with ``TCP_NODELAY``, which :mod:`http.client` sets).

:mod:`http.client` frames requests and answers, opens TLS connections and proxy tunnels; this
module adds what the SDK needs on top:

- **Retries that cannot duplicate a request.** A request is sent again (once, on a fresh
  connection) only when that cannot make the server act on it twice: when it failed before its
  first byte was written, or when it is idempotent (``GET``, or a call made with
  ``idempotent=True``, such as a heartbeat) and a kept-alive connection turned out to be closed
  before any byte of the answer came. A ``POST`` that is not idempotent (joining, uploading)
  is otherwise never re-sent: its failure is raised, and the caller decides (uploads carry a
  token that the aggregator accepts once, so the runner can send one again safely).
- **A pool of idle connections per origin**, shared by threads: an :class:`HttpClient` may be
  used from several threads at once (the runner's heartbeat thread and its main thread share
  one). An idle connection is checked with ``poll`` (not ``select``, which cannot watch a file
  descriptor above 1023) before it is reused, so one the server closed meanwhile is replaced
  before anything is sent on it.
- **Downloads into one buffer**: a body with a ``Content-Length`` is read in place into a
  buffer of that size (private anonymous memory, or the caller's buffer of the previous round).
- **Chunked answers whose lines end in a bare LF** are read, as RFC 9112 allows a recipient to
  (``http.client`` expects CRLF after each chunk).
- **TLS options** (:class:`HttpClient`'s ``ca_file``, ``client_cert``, ``client_key``; the
  system's roots by default) and **proxies from the environment** (``HTTP_PROXY``,
  ``HTTPS_PROXY``, ``NO_PROXY``, read as :mod:`urllib.request` reads them; ``https`` goes
  through a ``CONNECT`` tunnel). Plain ``http`` to an address that is not a loopback one is
  logged once, as a warning: secrets, tokens and models then cross the network unencrypted.

Every answer of 400 or more becomes an :class:`~rondo.errors.ApiError`; every failure to reach a
service or to finish an exchange with it, a :class:`~rondo.errors.NetworkError`.

:class:`Transport` is the interface :func:`rondo.run_participant` needs; :class:`HttpClient`
implements it, and a caller may pass any other implementation (``transport=``).
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import mmap
import os
import select
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable
from urllib.parse import unquote, urlencode, urljoin, urlsplit

import numpy as np

from .errors import ApiError, NetworkError

if TYPE_CHECKING:
    import ssl

_LOG = logging.getLogger("rondo.transport")

READ_CHUNK_BYTES = 1 << 16
"""Bytes read at a time from an answer of unknown length (chunked, or ended by closing)."""

MAX_LINE_BYTES = 65536
"""Longest chunk-size or trailer line accepted in a chunked answer."""

MAX_HEADERS = 100
"""Most header fields accepted in an answer (as ``http.client``)."""

MAX_IDLE_PER_ORIGIN = 8
"""Idle connections kept per origin; more are closed when their exchange ends."""

STREAM_CHUNK_BYTES = 1 << 20
"""Bytes read at a time when a body is streamed to a file (:meth:`HttpClient.fetch`)."""

MAX_REDIRECTS = 5
"""Most redirects :meth:`HttpClient.fetch` follows for one request."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods that may be sent again after a failure (RFC 9110, 9.2.2); ``POST`` only when the
caller says so (``idempotent=True``)."""


class SizedPieces(Protocol):
    """An upload body: its total length, and its pieces in order (bytes or memoryviews)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[bytes | memoryview]: ...


@runtime_checkable
class Transport(Protocol):
    """What :func:`rondo.run_participant` needs of HTTP; :class:`HttpClient` is one.

    Pass another implementation as ``run_participant(..., transport=...)`` to route the SDK's
    traffic your own way (a company HTTP stack, a test double). The runner calls it from two
    threads at once (the heartbeat thread's long polls while the main thread downloads or
    uploads), so it must be thread-safe. The runner does not close it: the caller owns it.

    Every method raises :class:`~rondo.errors.ApiError` for an answer of 400 or more (with the
    ``code`` of the documented ``{"error": {"code", "message"}}`` body, else ``http_<status>``)
    and :class:`~rondo.errors.NetworkError` when the service could not be reached or the
    exchange broke off; the runner's handling of failures depends on that split.
    """

    def call(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        params: Mapping[str, str | float] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """A JSON exchange: ``params`` become the query, ``body`` (when not None) is sent as
        JSON; returns the parsed answer (None for an empty one). ``idempotent`` says whether
        the request may be sent twice (None: by its method), for a transport that retries."""
        ...

    def download(
        self,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        into: np.ndarray | None = None,
    ) -> np.ndarray:
        """GET ``url``; its body as a writable 1-D ``uint8`` array. ``into`` is a buffer the
        body may be read into when it has exactly the body's size (or ignored)."""
        ...

    def upload(
        self,
        url: str,
        pieces: SizedPieces,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """POST the concatenated ``pieces`` (``len(pieces)`` bytes in all) and return the
        parsed JSON answer."""
        ...


class Sink(Protocol):
    """Where :meth:`HttpClient.fetch` writes a body: a binary file, or anything with its
    ``write``. Each piece is a memoryview valid only during the call."""

    def write(self, data: memoryview, /) -> object: ...


@dataclass(frozen=True)
class Fetched:
    """The answer to :meth:`HttpClient.fetch`."""

    url: str
    """The URL that answered, after any redirects."""
    status: int
    headers: dict[str, str]
    """The answer's header fields, names in lower case."""
    body: bytes | None
    """The body; None when it was streamed to a ``sink``."""
    length: int
    """Bytes of the body."""


def _error_from(status: int, body: bytes | bytearray) -> ApiError:
    """The documented ``{"error": {"code", "message"}}`` body as an ApiError; any other body
    gets the code ``http_<status>``."""
    code, message = f"http_{status}", bytes(body[:500]).decode("utf-8", "replace")
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
    flags = getattr(mmap, "MAP_PRIVATE", None)
    if flags is None:  # Windows: anonymous memory, no flags
        return np.frombuffer(mmap.mmap(-1, size), np.uint8)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), np.uint8)


class _BadFraming(http.client.HTTPException):
    """An answer whose body framing this client cannot follow."""


class _Headers:
    """An answer's header fields, looked up by name in any case: what :class:`_Response` and
    :class:`http.client.HTTPResponse`'s own methods ask of ``response.headers``.

    Used instead of :class:`http.client.HTTPMessage`, which parses a head with the
    :mod:`email` package: for the SDK's small JSON answers that parse was a third of each
    call's CPU time (about 60 of 180 microseconds here), and a hundred participants make
    several calls each per round.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for key, value in self._fields:
            if key.lower() == name:
                return value
        return default

    def get_all(self, name: str, failobj: Any = None) -> Any:
        name = name.lower()
        found = [value for key, value in self._fields if key.lower() == name]
        return found or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def keys(self) -> list[str]:
        return [key for key, _ in self._fields]

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._fields)


def _read_head(fp: Any) -> list[tuple[str, str]]:
    """The header fields of an answer, up to its blank line, as (name, value) pairs (values
    with obsolete line folding joined by a space); the limits are ``http.client``'s."""
    fields: list[tuple[str, str]] = []
    for _ in range(MAX_HEADERS + 1):
        line = fp.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return fields
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and fields:  # obs-fold: continues the previous field's value
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if not colon:
            raise _BadFraming(f"bad header line {line[:40]!r}")
        fields.append((name.strip(), value.strip()))
    raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


class _Response(http.client.HTTPResponse):
    """:class:`http.client.HTTPResponse` with a leaner head parser, reading chunked bodies
    whose lines end in a bare LF.

    The head is read by :meth:`begin` here, into :class:`_Headers`; the status line, the
    keep-alive rule and the body framing are ``http.client``'s own logic.

    ``http.client`` skips two bytes after each chunk's data, taking them for the CRLF; after a
    bare LF that swallows the next size line's first digit. Here a chunked body is read by this
    class (``readinto`` and ``read``, the two the SDK uses); any other framing, by
    ``http.client``'s own code.
    """

    _left_in_chunk = 0  # bytes of the current chunk not read yet

    def begin(self) -> None:
        """Read the status line and the head (as :meth:`http.client.HTTPResponse.begin`
        does, with :func:`_read_head` in place of the ``email`` parser)."""
        if self.headers is not None:
            return  # already begun
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_head(self.fp)  # an interim 100 answer: its head is skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        headers = _Headers(_read_head(self.fp))
        self.headers = self.msg = headers  # type: ignore[assignment]
        encoding = headers.get("transfer-encoding")
        self.chunked = bool(encoding) and encoding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = headers.get("content-length")
        if length is not None and not self.chunked:
            # One non-negative number, or the answer is refused: http.client would quietly
            # read a body of a bad length until the connection closes.
            if not (length.isdigit() and length.isascii()):
                raise _BadFraming(f"bad Content-Length {length!r}")
            self.length = int(length)
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # the body ends when the connection closes

    def readinto(self, b: Any) -> int:
        if not self.chunked or self.fp is None:
            return super().readinto(b)
        view = memoryview(b).cast("B")
        if not len(view):
            return 0
        if self._left_in_chunk == 0:
            self._left_in_chunk = self._next_chunk_size()
            if self._left_in_chunk == 0:
                self._skip_trailers()
                self.close()  # the body is complete: the connection may carry the next one
                return 0
        n = self.fp.readinto(view[: self._left_in_chunk])
        if not n:
            raise http.client.IncompleteRead(b"")
        self._left_in_chunk -= n
        if self._left_in_chunk == 0:
            self._end_of_line("a chunk's data")
        return n

    def read(self, amt: int | None = None) -> bytes:
        if not self.chunked or self.fp is None:
            return super().read(amt)
        if amt is not None:
            buffer = bytearray(amt)
            return bytes(buffer[: self.readinto(buffer)])
        return bytes(_read_unsized(self))

    def _line(self) -> bytes:
        assert self.fp is not None
        line = self.fp.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise http.client.LineTooLong("chunk size or trailer line")
        return line

    def _next_chunk_size(self) -> int:
        line = self._line()
        if not line:
            raise http.client.IncompleteRead(b"")
        size = line.split(b";", 1)[0].strip()
        try:
            value = int(size, 16)
        except ValueError:
            raise _BadFraming(f"bad chunk size {size[:20]!r}") from None
        if value < 0 or size.startswith((b"-", b"+")):
            raise _BadFraming(f"bad chunk size {size[:20]!r}")
        return value

    def _end_of_line(self, what: str) -> None:
        assert self.fp is not None
        ending = self.fp.read(1)
        if ending == b"\r":
            ending = self.fp.read(1)
        if ending != b"\n":
            raise _BadFraming(f"{what} does not end with CRLF or LF")

    def _skip_trailers(self) -> None:
        while self._line() not in (b"\r\n", b"\n", b""):
            pass  # trailers: none are used


class _HTTPConnection(http.client.HTTPConnection):
    response_class = _Response


if hasattr(http.client, "HTTPSConnection"):

    class _HTTPSConnection(http.client.HTTPSConnection):
        response_class = _Response


class _Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header, from the proxy URL's user info


_Origin = tuple[str, str, int]  # scheme, host, port


class _Connection:
    """One pooled connection and where it belongs."""

    __slots__ = ("http", "origin", "generation")

    def __init__(self, http_: http.client.HTTPConnection, origin: _Origin, generation: int):
        self.http = http_
        self.origin = origin
        self.generation = generation


class _Retry(Exception):
    """Internal: the exchange may be tried once more on a fresh connection."""


class HttpClient:
    """Persistent HTTP(S) connections to the Rondo services; safe to share between threads.

    Args:
        connect_timeout: seconds to wait for a TCP connection (and its TLS handshake, or its
            proxy tunnel) to open; a request's own ``timeout`` caps it.
        ca_file: a PEM file of the certificate authorities to trust for ``https`` URLs,
            instead of the system's (e.g. a private CA the services' certificates come from).
        client_cert: a PEM certificate chain to present for mutual TLS; it may hold the key.
        client_key: the PEM private key of ``client_cert``, when it is a file of its own.
        trust_env: use the proxies named by ``HTTP_PROXY``/``HTTPS_PROXY`` (or their lower-case
            forms) except for the hosts ``NO_PROXY`` names. Read the first time the client
            connects to an origin.

    ``https`` URLs are verified (certificate chain and host name) against ``ca_file`` when
    given, else the system's roots.

    Raises:
        OSError, ssl.SSLError: ``ca_file``, ``client_cert`` or ``client_key`` cannot be loaded
            (at once, not at the first request).
    """

    def __init__(
        self,
        connect_timeout: float = 10.0,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        trust_env: bool = True,
    ) -> None:
        if client_key is not None and client_cert is None:
            raise ValueError("client_key needs client_cert")
        self.connect_timeout = connect_timeout
        self.ca_file = ca_file
        self.client_cert = client_cert
        self.client_key = client_key
        self.trust_env = trust_env
        self._lock = threading.Lock()
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._routes: dict[_Origin, _Proxy | None] = {}
        self._generation = 0  # bumped by close(): connections of older ones are not pooled
        self._ssl_context_: ssl.SSLContext | None = None
        if ca_file is not None or client_cert is not None:
            self._ssl_context()  # a bad file is an error now, not at the first request

    def close(self) -> None:
        """Close the idle connections; those in use close when their exchange ends. The client
        stays usable (it opens new connections)."""
        with self._lock:
            self._generation += 1
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for connection in idle:
            connection.http.close()

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
        idempotent: bool | None = None,
    ) -> Any:
        """A JSON exchange: ``body`` (when not None) is sent as JSON; the answer is parsed.

        ``idempotent`` (default: by the method, so not for ``POST``) allows sending the
        request again when a kept-alive connection turns out to have been closed by the
        server; pass True for a ``POST`` that the server may safely see twice.

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
        if idempotent is None:
            idempotent = method.upper() in IDEMPOTENT_METHODS
        connection, response = self._exchange(method, url, all_headers, data, timeout, idempotent)
        payload = self._read_all(connection, response, method, url)
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
        """GET ``url`` into a writable 1-D ``uint8`` array, read straight off the connection.

        With a ``Content-Length``, the body is read in place into ``into`` when it has exactly
        that size (its old contents are overwritten), else into one new buffer of that size:
        no chunk list, no join, no second copy of a possibly-gigabyte model. Bodies of unknown
        length (chunked, or ended by closing the connection) are gathered and then copied once.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the connection failed or closed before the whole body came.
        """
        connection, response = self._exchange("GET", url, dict(headers or {}), None, timeout, True)
        if response.status >= 400:
            raise _error_from(response.status, self._read_all(connection, response, "GET", url))
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity"):
            self._discard(connection)
            raise NetworkError(f"download of {url} came with Content-Encoding {encoding!r}")
        total = response.length
        if total is None or response.chunked:
            return np.frombuffer(self._read_all(connection, response, "GET", url), np.uint8)
        fits = into is not None and into.shape == (total,) and into.dtype == np.uint8
        buffer = into if fits else _new_buffer(total)
        got = 0
        try:
            with memoryview(buffer) as view:
                while got < total and (n := response.readinto(view[got:])):
                    got += n
        except (OSError, http.client.HTTPException) as exc:
            self._discard(connection)
            raise NetworkError(
                f"download of {url} failed after {got} of {total} bytes: {exc!r}"
            ) from exc
        if got < total:
            self._discard(connection)
            raise NetworkError(
                f"download of {url} failed after {got} of {total} bytes: the connection closed"
            )
        if not response.isclosed():
            response.read()  # an empty body: nothing to read, but this marks the answer done
        self._release(connection, response)
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

        Not idempotent: once a byte of it may have reached the server, a failure is raised, not
        retried. A service that refuses an upload may answer before reading it all and close
        the connection: its answer is still read and raised as the ApiError it is.

        Raises:
            ApiError: the service answered 400 or more.
            NetworkError: the service could not be reached or the exchange broke off.
        """
        all_headers = {**(headers or {}), "Content-Length": str(len(pieces))}
        connection, response = self._exchange("POST", url, all_headers, pieces, timeout, False)
        payload = self._read_all(connection, response, "POST", url)
        if response.status >= 400:
            raise _error_from(response.status, payload)
        return json.loads(payload) if payload else None

    def fetch(
        self,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        sink: Sink | None = None,
        max_redirects: int = MAX_REDIRECTS,
    ) -> Fetched:
        """GET ``url``, following redirects (301, 302, 303, 307, 308; e.g. the coordinator's
        ``/v1/rounds/{r}/model``, which sends the client to the aggregator), and return the
        final answer with its headers: the body in memory, or, with ``sink``, written to it
        piece by piece as it arrives (a model of any size, in memory a megabyte at a time).

        An ``Authorization`` header is not carried to another origin than the one it was
        meant for. ``call``, ``download`` and ``upload`` follow no redirect.

        Raises:
            ApiError: the final answer was 400 or more.
            NetworkError: the service could not be reached, the body ended early, or there
                were more than ``max_redirects`` redirects (or one without a ``Location``).
        """
        all_headers = dict(headers or {})
        for _ in range(max_redirects + 1):
            connection, response = self._exchange("GET", url, all_headers, None, timeout, True)
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                self._read_all(connection, response, "GET", url)
                if not location:
                    raise NetworkError(f"GET {url}: a {response.status} without a Location")
                target = urljoin(url, location)
                if _origin(target)[0] != _origin(url)[0]:
                    all_headers = {
                        k: v for k, v in all_headers.items() if k.lower() != "authorization"
                    }
                url = target
                continue
            if response.status >= 400:
                raise _error_from(response.status, self._read_all(connection, response, "GET", url))
            fields = {name.lower(): value for name, value in response.getheaders()}
            if sink is None:
                body = bytes(self._read_all(connection, response, "GET", url))
                return Fetched(url, response.status, fields, body, len(body))
            return Fetched(
                url, response.status, fields, None, self._stream(connection, response, url, sink)
            )
        raise NetworkError(f"GET {url}: more than {max_redirects} redirects")

    def _stream(
        self,
        connection: _Connection,
        response: http.client.HTTPResponse,
        url: str,
        sink: Sink,
    ) -> int:
        """Writes the body to ``sink`` as it arrives; its length."""
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity"):
            self._discard(connection)
            raise NetworkError(f"download of {url} came with Content-Encoding {encoding!r}")
        total = None if response.chunked else response.length
        got = 0
        buffer = bytearray(STREAM_CHUNK_BYTES)
        with memoryview(buffer) as view:
            while True:
                try:
                    n = response.readinto(view)
                except (OSError, http.client.HTTPException) as exc:
                    self._discard(connection)
                    raise NetworkError(
                        f"download of {url} failed after {got} bytes: {exc!r}"
                    ) from exc
                if not n:
                    break
                try:
                    sink.write(view[:n])
                except BaseException:
                    # The sink's own failure (a full disk, say), raised as it is.
                    self._discard(connection)
                    raise
                got += n
        if total is not None and got < total:
            self._discard(connection)
            raise NetworkError(
                f"download of {url} failed after {got} of {total} bytes: the connection closed"
            )
        self._release(connection, response)
        return got

    # --- exchanges --------------------------------------------------------------------------

    def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | SizedPieces | None,
        timeout: float,
        idempotent: bool,
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        """Send a request and read the answer's status and headers (not its body)."""
        origin, target = _origin(url)
        proxy = self._route(origin)
        if proxy is not None and origin[0] == "http":
            target = url.split("#", 1)[0]  # through a proxy: the absolute form
            if proxy.authorization:
                headers = {**headers, "Proxy-Authorization": proxy.authorization}
        args = (origin, proxy, method, target, headers, body, timeout, idempotent)
        try:
            try:
                return self._try(*args, fresh=False)
            except _Retry:
                # Nothing of the request reached the server, or it may see it twice: once more,
                # on a fresh connection (the idle ones may all be stale alike, after a restart).
                return self._try(*args, fresh=True)
        except (OSError, http.client.HTTPException) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            raise NetworkError(f"{method} {url} {what}") from exc

    def _try(
        self,
        origin: _Origin,
        proxy: _Proxy | None,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | SizedPieces | None,
        timeout: float,
        idempotent: bool,
        *,
        fresh: bool,
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        """One attempt, on an idle connection from the pool unless ``fresh``; raises
        :class:`_Retry` when the request was sent on a kept-alive connection that the server
        had closed, and sending it again is safe: nothing of it was written, or it is
        idempotent."""
        connection = self._checkout(origin, proxy, fresh=fresh)
        conn = connection.http
        reused = conn.sock is not None
        head_written = False
        try:
            if not reused:
                conn.timeout = min(self.connect_timeout, timeout)
                conn.connect()  # a failure here is raised: the service is not there
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            # Downloads are read as sent, in place: http.client asks for no compression
            # (Accept-Encoding: identity) unless told to skip that header.
            conn.putrequest(method, target)
            for name, value in headers.items():
                conn.putheader(name, value)
            if isinstance(body, bytes) or (body is None and method in ("POST", "PUT", "PATCH")):
                conn.putheader("Content-Length", str(len(body or b"")))
            # The head is one small write: when it fails, none of it was queued.
            conn.endheaders()
            head_written = True
            if isinstance(body, bytes):
                conn.send(body)
            elif body is not None:
                try:
                    for piece in body:
                        if len(piece):
                            conn.send(piece)
                except _WRITE_REFUSED:
                    # The server may have answered (a refusal) and closed without reading the
                    # rest: its answer is read below.
                    pass
            response = conn.getresponse()
            return connection, response
        except BaseException as exc:
            self._discard(connection)
            if reused and isinstance(exc, _STALE) and (idempotent or not head_written):
                raise _Retry from exc
            raise

    def _read_all(
        self, connection: _Connection, response: http.client.HTTPResponse, method: str, url: str
    ) -> bytearray:
        """The whole body; the connection goes back to the pool when it is read to its end."""
        try:
            if response.length is not None and not response.chunked:
                data = bytearray(response.read())  # raises IncompleteRead when cut short
            else:
                data = _read_unsized(response)
        except (OSError, http.client.HTTPException) as exc:
            self._discard(connection)
            raise NetworkError(f"{method} {url}: reading the answer failed: {exc!r}") from exc
        self._release(connection, response)
        return data

    # --- the pool ---------------------------------------------------------------------------

    def _checkout(self, origin: _Origin, proxy: _Proxy | None, fresh: bool) -> _Connection:
        """An idle connection to ``origin`` that is still open, else a new (unopened) one."""
        while not fresh:
            with self._lock:
                idle = self._idle.get(origin)
                connection = idle.pop() if idle else None
            if connection is None:
                break
            if _still_open(connection.http.sock):
                return connection
            connection.http.close()  # the server closed it while it sat idle
        with self._lock:
            generation = self._generation
        return _Connection(self._new_connection(origin, proxy), origin, generation)

    def _release(self, connection: _Connection, response: http.client.HTTPResponse) -> None:
        """Back to the pool after an exchange whose answer was read to its end."""
        if connection.http.sock is None or not response.isclosed():
            self._discard(connection)  # the server said it closes it, or the body is not done
            return
        with self._lock:
            if connection.generation == self._generation:
                idle = self._idle.setdefault(connection.origin, [])
                if len(idle) < MAX_IDLE_PER_ORIGIN:
                    idle.append(connection)
                    return
        connection.http.close()

    @staticmethod
    def _discard(connection: _Connection) -> None:
        """Close a connection in an unknown state (after a failure, or mid-answer)."""
        connection.http.close()

    def _new_connection(self, origin: _Origin, proxy: _Proxy | None) -> http.client.HTTPConnection:
        scheme, host, port = origin
        timeout = self.connect_timeout
        if scheme == "http":
            if not _is_loopback(host):
                _warn_plain_http_once(origin)
            if proxy is not None:
                return _HTTPConnection(proxy.host, proxy.port, timeout=timeout)
            return _HTTPConnection(host, port, timeout=timeout)
        if "_HTTPSConnection" not in globals():
            raise NetworkError(f"https://{host}: this Python has no ssl module")
        context = self._ssl_context()
        if proxy is None:
            return _HTTPSConnection(host, port, timeout=timeout, context=context)
        conn = _HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=context)
        tunnel_headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else {}
        conn.set_tunnel(host, port, headers=tunnel_headers)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl_context_ is None:
                import ssl

                context = ssl.create_default_context(cafile=self.ca_file)
                if self.client_cert is not None:
                    context.load_cert_chain(self.client_cert, self.client_key)
                    if context.post_handshake_auth is not None:
                        context.post_handshake_auth = True
                context.set_alpn_protocols(["http/1.1"])
                self._ssl_context_ = context
            return self._ssl_context_

    def _route(self, origin: _Origin) -> _Proxy | None:
        """The proxy for ``origin`` (None: direct), looked up once per origin."""
        with self._lock:
            if origin in self._routes:
                return self._routes[origin]
        proxy = _env_proxy(*origin) if self.trust_env else None
        with self._lock:
            self._routes[origin] = proxy
        return proxy


# Failures of a kept-alive connection that the server closed: nothing of the answer came.
_STALE: tuple[type[BaseException], ...] = (
    ConnectionResetError,  # also http.client.RemoteDisconnected: closed without an answer
    ConnectionAbortedError,
    BrokenPipeError,
)
# Writing an upload's body failed because the server stopped reading it.
_WRITE_REFUSED: tuple[type[BaseException], ...] = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)
try:
    import ssl as _ssl
except ImportError:  # pragma: no cover - Python without ssl
    pass
else:
    _STALE += (_ssl.SSLEOFError, _ssl.SSLZeroReturnError)
    _WRITE_REFUSED += (_ssl.SSLEOFError,)


def _read_unsized(response: http.client.HTTPResponse) -> bytearray:
    """A body of unknown length (chunked, or ended by closing the connection), gathered."""
    parts = []
    chunk = bytearray(READ_CHUNK_BYTES)
    with memoryview(chunk) as view:
        while n := response.readinto(view):
            parts.append(bytes(view[:n]))
    return bytearray().join(parts)


def _origin(url: str) -> tuple[_Origin, str]:
    """(scheme, host, port) of ``url``, and its request target (path and query)."""
    base, _, query = url.partition("?")
    if "#" in url:
        origin, path, query = _split_url(url)
    else:
        # The split of the part before the query is cached: a participant asks the same few
        # URLs (its heartbeat's, with a changing query) again and again.
        origin, path, _ = _split_url(base)
    return origin, path + (f"?{query}" if query else "")


@functools.lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[_Origin, str, str]:
    """(scheme, host, port), path and query of ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NetworkError(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise NetworkError(f"bad port in URL {url!r}") from exc
    return (parts.scheme, parts.hostname, port), parts.path or "/", parts.query


def _still_open(sock: socket.socket | None) -> bool:
    """Whether an idle kept-alive connection can carry the next request: nothing arrived on it
    while it sat idle (the server closing it, or breaking the protocol by talking unasked)."""
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()  # not select(): it fails on descriptors above 1023
            poller.register(sock, select.POLLIN | select.POLLPRI)
            readable = bool(poller.poll(0))
        else:  # Windows, whose select() has no such limit
            readable = bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False
    if not readable:
        return True
    if hasattr(sock, "pending"):  # TLS: the record may carry no data (a session ticket)
        import ssl

        timeout = sock.gettimeout()
        try:
            sock.settimeout(0)
            sock.recv(1)  # data (unasked) or the end: either way, not reusable
        except ssl.SSLWantReadError:
            return True
        except OSError:
            pass
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned_lock = threading.Lock()
_warned: set[_Origin] = set()


def _warn_plain_http_once(origin: _Origin) -> None:
    with _warned_lock:
        if origin in _warned:
            return
        _warned.add(origin)
    scheme, host, port = origin
    _LOG.warning(
        "connecting to http://%s:%d without TLS: secrets, tokens and models cross the network "
        "unencrypted; use an https:// URL",
        host,
        port,
    )


def _env_proxy(scheme: str, host: str, port: int) -> _Proxy | None:
    """The proxy the environment names for ``scheme://host:port``, as :mod:`urllib.request`
    reads it (``<scheme>_proxy`` or its upper-case form; ``no_proxy``), or None."""
    if sys.platform not in ("darwin", "win32") and not any(
        key.lower().endswith("_proxy") for key in os.environ
    ):
        return None  # nothing to read: spare the import of urllib.request
    import urllib.request

    url = urllib.request.getproxies().get(scheme)
    if not url:
        return None
    name = f"[{host}]" if ":" in host else host
    if urllib.request.proxy_bypass(f"{name}:{port}"):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise NetworkError(
            f"the {scheme} proxy {url!r} from the environment is not an http:// proxy, "
            "the only kind the SDK speaks to"
        )
    try:
        proxy_port = parts.port or 80
    except ValueError as exc:
        raise NetworkError(f"bad port in the proxy URL {url!r}") from exc
    authorization = None
    if parts.username is not None:
        import base64

        user_info = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(user_info.encode()).decode("ascii")
    return _Proxy(parts.hostname, proxy_port, authorization)
