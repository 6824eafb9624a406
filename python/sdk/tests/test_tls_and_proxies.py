"""rondo.transport over TLS (a CA made here, mutual TLS), through proxies named by the
environment, and run_participant with a transport of the caller's."""

from __future__ import annotations

import datetime
import ipaddress
import json
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import AddOne, TlsServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rondo import ApiError, NetworkError, Transport, run_participant
from rondo.transport import HttpClient

# --- a small PKI -------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # the CA that issued the server's and the client's certificates
    other_ca: Path  # a CA that issued nothing here
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_bundle: Path  # the client's certificate and key in one file
    misnamed_cert: Path  # a server certificate, by the CA, for another host name
    misnamed_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> bytes:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(data)
    return data


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> x509.Certificate:
    """A CA certificate (``issuer`` None: self-signed) or a leaf one, with the extensions that
    strict verification (Python 3.13's default) asks for."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False
        )
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            True,
        )  # fmt: skip
        assert usage is not None
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            alt: list[x509.GeneralName] = []
            for name in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Rondo test CA", ca_key, None)
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("Another CA", other_key, None)
    (folder / "other-ca.pem").write_bytes(other.public_bytes(pem))
    paths = {}
    for who, usage, names in [
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, ("localhost", "127.0.0.1")),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ()),
        ("misnamed", ExtendedKeyUsageOID.SERVER_AUTH, ("elsewhere.test",)),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"rondo {who}", key, (ca, ca_key), usage, names)
        cert_pem = cert.public_bytes(pem)
        (folder / f"{who}.pem").write_bytes(cert_pem)
        key_pem = _write_key(key, folder / f"{who}.key")
        paths[who] = cert_pem + key_pem
    (folder / "client-bundle.pem").write_bytes(paths["client"])
    return Pki(
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        client_bundle=folder / "client-bundle.pem",
        misnamed_cert=folder / "misnamed.pem",
        misnamed_key=folder / "misnamed.key",
    )


# --- servers -----------------------------------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


def _handler_class(handle: Handler) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

        do_POST = do_GET

    return RequestHandler


@pytest.fixture
def serve_http() -> Iterator[Callable[..., str]]:
    """``serve(handle, tls=None)``: an HTTP (or, with an SSLContext, HTTPS) server for
    ``handle``; returns its base URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(handle: Handler, tls: ssl.SSLContext | None = None) -> str:
        if tls is None:
            httpd: ThreadingHTTPServer = ThreadingHTTPServer(
                ("127.0.0.1", 0), _handler_class(handle)
            )
            httpd.daemon_threads = True
        else:
            httpd = TlsServer(("127.0.0.1", 0), _handler_class(handle), tls)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        scheme = "http" if tls is None else "https"
        return f"{scheme}://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def server_context(pki: Pki, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def echo(h: BaseHTTPRequestHandler) -> None:
    """Answers ``{"path", "body", "peer_cert"}``; ``/model`` with 1 MB of counting bytes."""
    body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
    if h.path == "/model":
        data = bytes(range(256)) * 4096
    else:
        peer = h.connection.getpeercert() if isinstance(h.connection, ssl.SSLSocket) else None
        subject = dict(x[0] for x in peer["subject"]) if peer else None
        answer = {"path": h.path, "body": body.decode("latin-1"), "peer": subject}
        data = json.dumps(answer).encode()
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


class Pieces:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        view = memoryview(self.data)
        for start in range(0, len(view), 1 << 16):
            yield view[start : start + (1 << 16)]


# --- TLS ---------------------------------------------------------------------------------------


def test_https_with_a_private_ca(serve_http, pki: Pki) -> None:
    url = serve_http(echo, tls=server_context(pki))
    with HttpClient(ca_file=pki.ca) as http:
        assert http.call("POST", f"{url}/a", body={"x": 1}, timeout=5)["body"] == '{"x": 1}'
        data = http.download(f"{url}/model", timeout=5)
        assert data.flags.writeable and bytes(data) == bytes(range(256)) * 4096
        payload = bytes(range(256)) * 1000
        answer = http.upload(f"{url}/update", Pieces(payload), timeout=5)
        assert answer["body"].encode("latin-1") == payload
        # Same origin, same connection: one TLS handshake for all of it.
        assert http.call("GET", f"{url}/b", timeout=5)["path"] == "/b"


def test_https_is_verified_against_the_system_roots_by_default(serve_http, pki: Pki) -> None:
    url = serve_http(echo, tls=server_context(pki))
    with HttpClient() as http, pytest.raises(NetworkError, match="CERTIFICATE_VERIFY_FAILED"):
        http.call("GET", url, timeout=5)
    with HttpClient(ca_file=pki.other_ca) as http, pytest.raises(NetworkError, match="VERIFY"):
        http.call("GET", url, timeout=5)


def test_https_checks_the_host_name(serve_http, pki: Pki) -> None:
    url = serve_http(echo, tls=server_context(pki))
    with HttpClient(ca_file=pki.ca) as http:
        assert http.call("GET", url.replace("127.0.0.1", "localhost"), timeout=5)["path"] == "/"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.misnamed_cert, pki.misnamed_key)  # for elsewhere.test
    url = serve_http(echo, tls=context)
    with HttpClient(ca_file=pki.ca) as http, pytest.raises(NetworkError, match="mismatch"):
        http.call("GET", url, timeout=5)


@pytest.mark.parametrize("bundle", [False, True])
def test_mutual_tls(serve_http, pki: Pki, bundle: bool) -> None:
    url = serve_http(echo, tls=server_context(pki, require_client_cert=True))
    with HttpClient(ca_file=pki.ca) as http, pytest.raises(NetworkError):
        http.call("GET", url, timeout=5)  # no client certificate: refused
    if bundle:
        http = HttpClient(ca_file=pki.ca, client_cert=pki.client_bundle)
    else:
        http = HttpClient(ca_file=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    with http:
        assert http.call("GET", f"{url}/m", timeout=5)["peer"] == {"commonName": "rondo client"}
        assert len(http.download(f"{url}/model", timeout=5)) == 1 << 20


def test_bad_tls_files_are_errors_at_once(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        HttpClient(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ssl.SSLError):
        HttpClient(client_cert=pki.client_cert)  # no key: neither in the file nor given
    with pytest.raises(ValueError, match="client_key needs client_cert"):
        HttpClient(client_key=pki.client_key)


def test_run_participant_over_https(serve, pki: Pki) -> None:
    """The whole protocol over mutual TLS: the fake services of conftest.py behind TLS."""
    fake = serve(rounds=2, tls=server_context(pki, require_client_cert=True))
    assert fake.url.startswith("https://")
    report = run_participant(
        AddOne(),
        fake.url,
        connect_timeout=5,
        ca_file=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    assert report.rounds_trained == [0, 1, 2] and report.final_action == "finish"
    assert fake.downloads == [1, 2]
    assert [u.round for u in fake.uploads] == [0, 1, 2]


# --- proxies -----------------------------------------------------------------------------------


class Proxy(ThreadingHTTPServer):
    """A forwarding HTTP proxy: absolute-form requests are sent on with http.client, CONNECT
    opens a tunnel. ``seen`` records each request line and its Proxy-Authorization."""

    daemon_threads = True

    def __init__(self) -> None:
        proxy = self
        self.seen: list[tuple[str, str, str | None]] = []

        class ProxyHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                import http.client
                from urllib.parse import urlsplit

                proxy.seen.append((self.command, self.path, self.headers["Proxy-Authorization"]))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                target = urlsplit(self.path)
                assert target.scheme == "http", self.path  # the absolute form
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                headers = {
                    k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")
                }
                path = target.path + (f"?{target.query}" if target.query else "")
                upstream.request(self.command, path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Via", "1.1 test-proxy")
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_POST = do_GET

            def do_CONNECT(self) -> None:
                proxy.seen.append((self.command, self.path, self.headers["Proxy-Authorization"]))
                host, _, port = self.path.rpartition(":")
                upstream = socket.create_connection((host, int(port)), timeout=10)
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                client = self.connection
                try:
                    while True:
                        readable, _, _ = select.select([client, upstream], [], [], 10)
                        if not readable:
                            return
                        for sock in readable:
                            data = sock.recv(1 << 16)
                            if not data:
                                return
                            (upstream if sock is client else client).sendall(data)
                finally:
                    upstream.close()
                    self.close_connection = True

        super().__init__(("127.0.0.1", 0), ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    server = Proxy()
    yield server
    server.stop()


def test_http_proxy_from_the_environment(serve_http, proxy: Proxy, monkeypatch) -> None:
    url = serve_http(echo)
    monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://user:p%40ss@"))
    with HttpClient() as http:
        assert http.call("POST", f"{url}/a?b=1", body={"k": 2}, timeout=5) == {
            "path": "/a?b=1",
            "body": '{"k": 2}',
            "peer": None,
        }
        assert len(http.download(f"{url}/model", timeout=5)) == 1 << 20
    assert [(m, p) for m, p, _ in proxy.seen] == [("POST", f"{url}/a?b=1"), ("GET", f"{url}/model")]
    assert {auth for _, _, auth in proxy.seen} == {"Basic dXNlcjpwQHNz"}  # user:p@ss


def test_no_proxy_bypasses_it(serve_http, proxy: Proxy, monkeypatch) -> None:
    url = serve_http(echo)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
    with HttpClient() as http:
        assert http.call("GET", f"{url}/direct", timeout=5)["path"] == "/direct"
    monkeypatch.setenv("NO_PROXY", "example.org")
    with HttpClient(trust_env=False) as http:
        assert http.call("GET", f"{url}/direct", timeout=5)["path"] == "/direct"
    assert proxy.seen == []
    with HttpClient() as http:
        assert http.call("GET", f"{url}/proxied", timeout=5)["path"] == "/proxied"
    assert [p for _, p, _ in proxy.seen] == [f"{url}/proxied"]


def test_https_through_a_connect_tunnel(serve_http, pki: Pki, proxy: Proxy, monkeypatch) -> None:
    url = serve_http(echo, tls=server_context(pki, require_client_cert=True))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # not for https URLs
    with HttpClient(ca_file=pki.ca, client_cert=pki.client_bundle) as http:
        assert http.call("GET", f"{url}/t", timeout=5)["peer"] == {"commonName": "rondo client"}
        assert http.call("GET", f"{url}/u", timeout=5)["path"] == "/u"
    host = url.removeprefix("https://")
    assert proxy.seen == [("CONNECT", host, None)]  # one tunnel, kept alive


def test_a_proxy_that_is_not_http_is_refused(proxy: Proxy, monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
    with HttpClient() as http, pytest.raises(NetworkError, match="not an http:// proxy"):
        http.call("GET", "http://127.0.0.1:9/", timeout=1)


def test_run_participant_through_a_proxy(serve, proxy: Proxy, monkeypatch) -> None:
    fake = serve(rounds=1)
    monkeypatch.setenv("http_proxy", proxy.url)
    report = run_participant(AddOne(), fake.url, connect_timeout=5)
    assert report.rounds_trained == [0, 1]
    paths = {p.removeprefix(fake.url).split("?")[0] for _, p, _ in proxy.seen}
    assert {"/v1/participants", "/v1/rounds/1/model", "/v1/rounds/1/update"} <= paths
    assert any(p.endswith("/heartbeat") for p in paths)


# --- a transport of the caller's ---------------------------------------------------------------


class Recording:
    """A Transport that logs each exchange and hands it to an HttpClient."""

    def __init__(self) -> None:
        self.inner = HttpClient()
        self.log: list[tuple[str, str, bool | None]] = []
        self.lock = threading.Lock()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        self.inner.close()

    def _note(self, kind: str, url: str, idempotent: bool | None = None) -> None:
        with self.lock:
            self.log.append((kind, url.split("?")[0].split("/v1/", 1)[1], idempotent))

    def call(self, method: str, url: str, **kwargs: Any) -> Any:
        self._note(method, url, kwargs.get("idempotent"))
        return self.inner.call(method, url, **kwargs)

    def download(self, url: str, **kwargs: Any) -> np.ndarray:
        self._note("download", url)
        return self.inner.download(url, **kwargs)

    def upload(self, url: str, pieces: Any, **kwargs: Any) -> Any:
        self._note("upload", url)
        return self.inner.upload(url, pieces, **kwargs)


def test_an_injected_transport_is_used(serve) -> None:
    fake = serve(rounds=1)
    transport = Recording()
    assert isinstance(transport, Transport)
    report = run_participant(AddOne(), fake.url, connect_timeout=5, transport=transport)
    assert report.rounds_trained == [0, 1] and report.final_action == "finish"
    kinds = {(kind, idempotent) for kind, _, idempotent in transport.log}
    assert ("POST", None) in kinds  # joining: by its method, not idempotent
    assert ("POST", True) in kinds  # heartbeats and start_training
    assert [e for e in transport.log if e[0] in ("download", "upload")] == [
        ("upload", "rounds/0/update", None),
        ("download", "rounds/1/model", None),
        ("upload", "rounds/1/update", None),
    ]
    assert any(path.endswith("/heartbeat") for _, path, _ in transport.log)
    assert transport.closed == 0  # the runner leaves it open: it is the caller's
    transport.close()


def test_a_transport_must_look_like_one(serve, pki: Pki) -> None:
    fake = serve(rounds=1)
    with pytest.raises(TypeError, match="Transport"):
        run_participant(AddOne(), fake.url, transport=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="transport"):
        run_participant(AddOne(), fake.url, transport=Recording(), ca_file=pki.ca)


def test_errors_of_an_injected_transport_are_handled_like_the_sdks(serve) -> None:
    """An ApiError from the transport's upload is a refused update, as with HttpClient."""
    fake = serve(rounds=2)

    class Refusing(Recording):
        def upload(self, url: str, pieces: Any, **kwargs: Any) -> Any:
            if "/rounds/1/" in url:
                with fake.lock:  # the fake closes the round without this update, later
                    fake.refused_heartbeats_left = fake.linger
                raise ApiError(400, "model_mismatch", "refused by the transport")
            return super().upload(url, pieces, **kwargs)

    report = run_participant(AddOne(), fake.url, connect_timeout=5, transport=Refusing())
    assert report.rejected_uploads == {1: "model_mismatch"}
    assert report.rounds_trained == [0, 2] and report.final_action == "finish"
