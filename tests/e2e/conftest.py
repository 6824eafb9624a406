"""Fixtures that start the real coordinator and aggregator binaries on free loopback ports.

Each service is started with port 0 and writes its bound addresses to a JSON file
(`runtime.addresses_file`), which the fixture waits for. Settings are passed as
`RONDO__SECTION__KEY` environment overrides on top of the dev configs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("RONDO_BIN_DIR", ROOT / "target" / "debug"))


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited early:\n{log.read_text()}")
        time.sleep(0.02)
    raise TimeoutError(f"{path} not written in time:\n{log.read_text()}")


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    addresses: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.addresses['api']}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(binary: str, tmp: Path, settings: dict[str, object], tag: str = "") -> Service:
    addresses = tmp / f"{binary}{tag}.addresses.json"
    log = tmp / f"{binary}{tag}.log"
    env = dict(os.environ)
    env.update(
        {
            "RONDO__API__PORT": "0",
            "RONDO__RPC__PORT": "0",
            "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
            "RUST_LOG": env.get("RUST_LOG", "info,tarpc=warn"),
        }
    )
    env.update({f"RONDO__{k.upper().replace('.', '__')}": str(v) for k, v in settings.items()})
    config = ROOT / "configs" / f"dev-{binary}.toml"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN_DIR / binary), "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Service(binary, process, _wait_for_file(addresses, process, log), log)


_restarts = itertools.count(1)


def restart_tag() -> str:
    """File tag of a restarted service: never one that a started federation uses (".1", ...)."""
    return f".restart{next(_restarts)}"


@dataclass
class Federation:
    """A running coordinator + aggregator pair."""

    coordinator: Service
    aggregator: Service
    services: list[Service] = field(default_factory=list)

    @property
    def coordinator_url(self) -> str:
        return self.coordinator.url

    @property
    def aggregator_url(self) -> str:
        return self.aggregator.url

    def status(self) -> dict:
        return requests.get(f"{self.coordinator_url}/v1/status", timeout=5).json()

    def aggregator_status(self) -> dict:
        return requests.get(f"{self.aggregator_url}/v1/status", timeout=5).json()

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        status = self.status()
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}; last status: {json.dumps(status)}")

    def stop(self) -> None:
        for service in (self.coordinator, self.aggregator):
            service.stop()

    def restart_aggregator(self, tmp: Path, settings: dict[str, object]) -> None:
        """Kills the aggregator (SIGKILL) and starts a new one on the same ports; whatever it
        held in memory is gone."""
        self.aggregator.process.kill()
        self.aggregator.process.wait()
        self.services.append(self.aggregator)
        api_port = self.aggregator.addresses["api"].rsplit(":", 1)[1]
        rpc_port = self.aggregator.addresses["rpc"].rsplit(":", 1)[1]
        self.aggregator = start_service(
            "aggregator",
            tmp,
            {"api.port": api_port, "rpc.port": rpc_port, **settings},
            tag=restart_tag(),
        )

    def restart_coordinator(self, tmp: Path, settings: dict[str, object]) -> None:
        """Kills the coordinator (SIGKILL: no goodbye) and starts a new one on the same API
        port, so that participants find it where the old one was."""
        self.coordinator.process.kill()
        self.coordinator.process.wait()
        self.services.append(self.coordinator)
        port = self.coordinator.addresses["api"].rsplit(":", 1)[1]
        self.coordinator = start_service(
            "coordinator",
            tmp,
            {
                "aggregator.rpc_address": self.aggregator.addresses["rpc"],
                "api.port": port,
                **settings,
            },
            tag=restart_tag(),
        )


@pytest.fixture
def start_federation(tmp_path: Path) -> Iterator:
    """Returns `start(coordinator_settings, aggregator_settings) -> Federation`; stops them all
    at the end of the test and prints their logs on failure."""
    started: list[Federation] = []

    def start(
        coordinator: dict[str, object] | None = None, aggregator: dict[str, object] | None = None
    ) -> Federation:
        # A second federation in one test gets files (addresses, logs) of its own.
        tag = f".{len(started)}" if started else ""
        agg = start_service("aggregator", tmp_path, aggregator or {}, tag=tag)
        coord_settings = {"aggregator.rpc_address": agg.addresses["rpc"], **(coordinator or {})}
        coord = start_service("coordinator", tmp_path, coord_settings, tag=tag)
        federation = Federation(coord, agg)
        started.append(federation)
        return federation

    yield start
    for federation in started:
        federation.stop()
        for service in (*federation.services, federation.coordinator, federation.aggregator):
            text = service.log.read_text(errors="replace")
            print(f"----- {service.name} log -----\n{text[-4000:]}")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, without persistence: a restart loses
    everything, which is what the durability tests need to play."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup --test-tools")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command("PING") == "+PONG":
                return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server did not answer on {self.port}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Kills it and starts an empty one on the same port."""
        self.stop()
        self.start()

    def command(self, *words: str) -> str | None:
        """One inline command; the first line of the answer, or None when nobody answers."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                conn.sendall((" ".join(words) + "\r\n").encode())
                return conn.recv(65536).split(b"\r\n", 1)[0].decode()
        except OSError:
            return None

    def cli(self, *words: str) -> str:
        """``redis-cli`` against this server: its output."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *words],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return result.stdout

    def keys(self, pattern: str = "*") -> list[str]:
        return sorted(self.cli("--raw", "KEYS", pattern).split())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test alone, stopped at its end."""
    server = RedisServer(free_port(), tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()


class TcpProxy:
    """A TCP proxy the test controls, between participants (or a service) and a service:
    ``stall_after(n)`` makes new connections stop forwarding after ``n`` bytes from the client
    (an upload cut off mid-body, once the far side dies), ``partition()`` cuts every
    connection and refuses new ones until ``heal()``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self.stall_bytes: int | None = None
        self.stalled = threading.Event()
        self.partitioned = False
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall_after(self, n: int | None) -> None:
        self.stall_bytes = n
        self.stalled.clear()

    def partition(self) -> None:
        self.partitioned = True
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connections.clear()

    def heal(self) -> None:
        self.partitioned = False

    def close(self) -> None:
        self.partition()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.partitioned or self.target is None:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.connections += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        sent = 0  # bytes from the client since a stall was asked for
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                limit = self.stall_bytes if upstream else None
                if limit is None:
                    sent = 0
                elif sent + len(data) > limit:
                    sink.sendall(data[: limit - sent])
                    self.stalled.set()
                    # Hold the rest: the client is stuck mid-body until the far side goes away.
                    while not self.partitioned and self.stall_bytes is not None:
                        time.sleep(0.05)
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()


@pytest.fixture
def tcp_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy()
    yield proxy
    proxy.close()


def kill_both_and_restart(
    federation: Federation,
    tmp: Path,
    coordinator: dict[str, object],
    aggregator: dict[str, object],
) -> None:
    """SIGKILLs both services at once, then starts both again on the same ports."""
    for service in (federation.coordinator, federation.aggregator):
        service.process.kill()
    for service in (federation.coordinator, federation.aggregator):
        service.process.wait()
    federation.restart_aggregator(tmp, aggregator)
    federation.restart_coordinator(tmp, coordinator)
