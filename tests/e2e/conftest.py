"""Fixtures that start the real coordinator and aggregator binaries on free loopback ports.

Each service is started with port 0 and writes its bound addresses to a JSON file
(`runtime.addresses_file`), which the fixture waits for. Settings are passed as
`RONDO__SECTION__KEY` environment overrides on top of the dev configs.
"""

from __future__ import annotations

import json
import os
import subprocess
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
            tag=f".{len(self.services)}",
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
            tag=f".{len(self.services)}",
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
