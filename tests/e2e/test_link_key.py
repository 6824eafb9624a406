"""The RPC link between the services proves a shared key (`rpc.key_file`): a stranger who can
reach an RPC port cannot open or close rounds, or tell the coordinator an update was accepted.

The forged calls are real ones: the coordinator's own `open_round` frame, recorded by a proxy
between the services and replayed with another attempt number. Without a key the replay
does open that round (so the forgery is a real threat); with a key, the same bytes are refused
before tarpc reads them and nothing changes.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import start_service
from test_bad_input import Person

KEY = "a-link-key-of-more-than-16-bytes"


class RecordingProxy:
    """Forwards one TCP port to another and keeps what the client sent."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    self.sent.extend(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def frames(data: bytes) -> list[bytes]:
    """The payloads of tarpc's length-delimited frames (4-byte big-endian lengths)."""
    out, at = [], 0
    while at + 4 <= len(data):
        (n,) = struct.unpack(">I", data[at : at + 4])
        out.append(bytes(data[at + 4 : at + 4 + n]))
        at += 4 + n
    return out


def forged_open_round(recorded: bytes, attempt: int) -> bytes:
    """The recorded open_round request frame with `attempt` in place of its own (after the
    client's half of a link handshake, when the recording has one: its nonce and tag)."""
    if not recorded.startswith(b"\x00"):
        recorded = recorded[64:]
    for payload in frames(recorded):
        message = json.loads(payload)
        text = json.dumps(message)
        if "OpenRound" not in text:
            continue
        request = message["Request"]["message"]["OpenRound"]["opening"]
        request["attempt"] = attempt
        body = json.dumps(message).encode()
        return struct.pack(">I", len(body)) + body
    raise AssertionError(f"no open_round frame among {frames(recorded)!r}")


def record_open_round(tmp: Path, key_settings: dict) -> bytes:
    """Runs a coordinator through a recording proxy until it opened round 0; its bytes."""
    aggregator = start_service("aggregator", tmp, {**key_settings}, tag=".rec")
    proxy = RecordingProxy(aggregator.addresses["rpc"])
    coordinator = start_service(
        "coordinator",
        tmp,
        {"aggregator.rpc_address": proxy.address, "federation.min_clients": 1, **key_settings},
        tag=".rec",
    )
    try:
        Person(coordinator.url, "p")
        deadline = time.monotonic() + 20
        while "OpenRound" not in proxy.sent.decode("latin-1"):
            assert time.monotonic() < deadline, "no open_round recorded"
            time.sleep(0.05)
        return bytes(proxy.sent)
    finally:
        coordinator.stop()
        aggregator.stop()
        proxy.listener.close()


def open_round(aggregator_url: str):
    return requests.get(f"{aggregator_url}/v1/status", timeout=5).json()["open_round"]


def replay(rpc_address: str, data: bytes) -> bytes:
    """Connects as a stranger, sends `data`, returns what came back before the close."""
    host, port = rpc_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        s.settimeout(7)  # past the server's handshake timeout
        got = bytearray()
        try:
            while chunk := s.recv(65536):
                got.extend(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return bytes(got)


def test_without_a_key_a_recorded_call_replayed_by_a_stranger_takes_effect(tmp_path):
    recorded = record_open_round(tmp_path, {})
    aggregator = start_service("aggregator", tmp_path, {})
    try:
        assert open_round(aggregator.url) is None
        replay(aggregator.addresses["rpc"], forged_open_round(recorded, attempt=7))
        assert open_round(aggregator.url) == {"round": 0, "attempt": 7}, "the threat is real"
    finally:
        aggregator.stop()


def test_with_a_key_strangers_change_nothing_and_the_federation_runs(start_federation, tmp_path):
    key_file = tmp_path / "link.key"
    key_file.write_text(KEY + "\n")
    keyed = {"rpc.key_file": key_file}
    recorded = record_open_round(tmp_path, keyed)
    federation = start_federation(
        coordinator={"federation.rounds": 1, "federation.min_clients": 2, **keyed},
        aggregator=keyed,
    )
    people = [Person(federation.coordinator_url, name) for name in "ab"]
    federation.wait_for(
        lambda s: s["phase"] == "training", what="round 0 to open over the keyed link"
    )
    before = open_round(federation.aggregator_url)
    assert before == {"round": 0, "attempt": 0}

    # A stranger replays a real open_round at the aggregator: refused at the handshake.
    answer = replay(federation.aggregator.addresses["rpc"], forged_open_round(recorded, 7))
    assert answer.startswith(b"RONDOLK1"), "only the challenge came back"
    assert open_round(federation.aggregator_url) == before
    # And a forged "update accepted" at the coordinator: refused too.
    notice = json.dumps(
        {
            "Request": {
                "context": {},
                "id": 1,
                "message": {"Notify": {"notice": {"notice": "accepted", "round": 0, "attempt": 0,
                            "participant_id": people[0].id, "n_samples": 5, "metrics": {}}}},
            }
        }
    ).encode()  # fmt: skip
    replay(federation.coordinator.addresses["rpc"], struct.pack(">I", len(notice)) + notice)
    status = federation.status()
    assert status["history"][-1]["delivered"] == []
    for service in (federation.aggregator, federation.coordinator):
        assert "refused an RPC connection" in service.log.read_text()
    # The keyed link itself works.
    assert status["phase"] == "training"


@pytest.mark.parametrize("keyed_side", ["coordinator", "aggregator"])
def test_a_key_on_one_side_only_keeps_them_apart(keyed_side, start_federation, tmp_path):
    key_file = tmp_path / "link.key"
    key_file.write_text(KEY)
    keyed = {"rpc.key_file": key_file}
    federation = start_federation(
        coordinator=keyed if keyed_side == "coordinator" else {},
        aggregator=keyed if keyed_side == "aggregator" else {},
    )
    time.sleep(6)  # past a handshake timeout
    assert federation.status()["phase"] == "waiting_for_aggregator"


def test_a_short_or_missing_key_file_stops_the_service_at_start_up(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("too short")
    for binary in ("coordinator", "aggregator"):
        for path in (short, tmp_path / "missing.key"):
            with pytest.raises(RuntimeError, match="rpc.key_file"):
                start_service(binary, tmp_path, {"rpc.key_file": path}, tag=f".{path.stem}")
