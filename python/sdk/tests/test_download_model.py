"""rondo.download_model against a fake aggregator with a model store and a fake coordinator that
redirects to it: the manifest first, the file streamed and checked (SHA-256, length, the
X-Rondo-Sha256 header) before it is renamed into place; anything that does not match leaves the
target as it was and no temporary file behind. And ``rondo download-model``."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import rondo
from rondo import cli
from rondo.safetensors_io import encode
from rondo.transport import HttpClient


def model_file(round_: int) -> bytes:
    weights = {"w": np.full((300, 1000), float(round_), np.float32)}  # 1.2 MB: several pieces
    return encode(weights, {"rondo.round": str(round_)})


def manifest_of(round_: int, data: bytes) -> dict:
    return {
        "round": round_,
        "attempt": 0,
        "source": "aggregated",
        "strategy": "fedavg",
        "contributors": {"p1": 10},
        "total_samples": 10,
        "file": f"round-{round_:06}.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "written_at": "2026-12-01T00:00:00.000Z",
        "rondo_version": "0.1.0",
    }


class Store(ThreadingHTTPServer):
    files: dict[int, bytes]
    manifests: dict[int, dict]
    served: dict[int, bytes]  # what GET .../model sends, when not the file itself
    sha_header: dict[int, str]
    store: bool
    requests: list[tuple[str, str | None]]


class StoreHandler(BaseHTTPRequestHandler):
    server: Store

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        parts = self.path.strip("/").split("/")
        if not self.server.store:
            self._error(404, "no_model_store", "this aggregator keeps no models")
        elif parts == ["v1", "models"]:
            models = [self.server.manifests[r] for r in sorted(self.server.manifests)]
            self._json(200, {"models": models, "keep_models": 0})
        elif len(parts) == 4 and parts[:2] == ["v1", "rounds"]:
            round_ = int(parts[2])
            if round_ not in self.server.manifests:
                self._error(404, "model_not_stored", f"round {round_} is not kept")
            elif parts[3] == "manifest":
                self._json(200, self.server.manifests[round_])
            else:
                body = self.server.served.get(round_, self.server.files[round_])
                sha = self.server.sha_header.get(round_, self.server.manifests[round_]["sha256"])
                self._send(200, body, {"X-Rondo-Sha256": sha, "X-Rondo-Round": str(round_)})
        else:
            self._error(404, "unknown_route", self.path)

    def _json(self, status: int, value: object) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": {"code": code, "message": message}})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Redirector(ThreadingHTTPServer):
    target: str
    requests: list[tuple[str, str | None]]


class RedirectHandler(BaseHTTPRequestHandler):
    server: Redirector

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        body = json.dumps({"location": self.server.target + self.path}).encode()
        self.send_response(307)
        self.send_header("Location", self.server.target + self.path)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def store() -> Iterator[tuple[Store, str]]:
    server = Store(("127.0.0.1", 0), StoreHandler)
    server.files = {r: model_file(r) for r in (1, 2, 3)}
    server.manifests = {r: manifest_of(r, data) for r, data in server.files.items()}
    server.served, server.sha_header, server.store, server.requests = {}, {}, True, []
    url = serve(server)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture
def coordinator(store: tuple[Store, str]) -> Iterator[tuple[Redirector, str]]:
    # Another origin than the store's, as the real coordinator is.
    server = Redirector(("127.0.0.1", 0), RedirectHandler)
    server.target = store[1].replace("127.0.0.1", "localhost")
    server.requests = []
    url = serve(server)
    yield server, url
    server.shutdown()
    server.server_close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_the_newest_or_a_given_round_through_a_redirect(store, coordinator, tmp_path):
    server, _ = store
    _, url = coordinator
    target = tmp_path / "model.safetensors"
    assert rondo.download_model(url, target) == server.manifests[3]
    assert target.read_bytes() == server.files[3]
    assert rondo.download_model(url, target, round=2) == server.manifests[2]
    assert target.read_bytes() == server.files[2]
    assert leftovers(tmp_path) == []
    paths = [path for path, _ in server.requests]
    assert paths == [
        "/v1/models",
        "/v1/rounds/3/model",
        "/v1/rounds/2/manifest",
        "/v1/rounds/2/model",
    ]


def test_an_authorization_header_does_not_follow_a_redirect_to_another_origin(store, coordinator):
    server, _ = store
    redirector, url = coordinator
    with HttpClient() as client:
        fetched = client.fetch(
            f"{url}/v1/rounds/1/model", timeout=10, headers={"Authorization": "Bearer secret"}
        )
    assert fetched.body == server.files[1] and fetched.status == 200
    assert fetched.url.startswith("http://localhost:")
    assert fetched.headers["x-rondo-sha256"] == server.manifests[1]["sha256"]
    assert redirector.requests == [("/v1/rounds/1/model", "Bearer secret")]
    assert server.requests == [("/v1/rounds/1/model", None)]


@pytest.mark.parametrize("damage", ["flipped", "short", "header"])
def test_a_file_that_is_not_the_manifests_is_never_put_in_place(store, tmp_path, damage):
    server, url = store
    good = server.files[2]
    if damage == "flipped":
        server.served[2] = good[:-1] + bytes([good[-1] ^ 1])
    elif damage == "short":
        server.served[2] = good[:-8]
    else:
        server.sha_header[2] = "0" * 64
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the previous model")
    with pytest.raises(rondo.ChecksumMismatch, match="not the model its manifest describes") as e:
        rondo.download_model(url, target, round=2)
    assert e.value.expected == server.manifests[2]["sha256"]
    assert target.read_bytes() == b"the previous model"
    assert leftovers(tmp_path) == []


def test_rounds_not_kept_and_no_store_are_not_available(store, tmp_path):
    server, url = store
    with pytest.raises(rondo.ModelNotAvailable, match="round 7 is not kept") as e:
        rondo.download_model(url, tmp_path / "m.safetensors", round=7)
    assert e.value.requested == 7
    server.manifests.clear()
    with pytest.raises(rondo.ModelNotAvailable, match="keeps no model yet"):
        rondo.download_model(url, tmp_path / "m.safetensors")
    server.store = False
    with pytest.raises(rondo.ModelNotAvailable, match="keeps no models"):
        rondo.download_model(url, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        rondo.download_model(url, tmp_path / "m.safetensors", round=-1)


def test_the_download_model_command(store, coordinator, tmp_path, capsys):
    server, _ = store
    _, url = coordinator
    target = tmp_path / "out.safetensors"
    out = io.StringIO()
    assert cli.main(["download-model", url, str(target), "--round", "1"], out) == 0
    assert target.read_bytes() == server.files[1]
    assert "round 1" in out.getvalue() and server.manifests[1]["sha256"] in out.getvalue()
    out = io.StringIO()
    assert cli.main(["download-model", url, str(target)], out) == 1
    assert "exists" in out.getvalue() and target.read_bytes() == server.files[1]
    assert cli.main(["download-model", url, str(target), "--force"], io.StringIO()) == 0
    assert target.read_bytes() == server.files[3]
    out = io.StringIO()
    assert cli.main(["download-model", url, str(tmp_path / "x"), "--round", "9"], out) == 1
    assert "not kept" in out.getvalue() and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as usage:
        cli.main(["download-model", url, str(target), "--round", "-1"])
    assert usage.value.code == 2
    capsys.readouterr()
