"""TLS on both services' HTTP listeners (`[api.tls] cert`, `key`), with a certificate authority
made in the test: a whole federation over HTTPS, participants verifying the servers against
the CA file they are given, and the SDK refusing a server it cannot verify."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import start_service
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.numpy import save_file
from test_rounds import Adder

import rondo
from rondo.safetensors_io import decode
from rondo.transport import HttpClient


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rondo test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_a_whole_federation_over_tls_on_every_listener(tmp_path):
    """Both services, both listeners each: HTTPS for participants, TLS on the RPC link in both
    directions (with the link key as well), all verified against the test's CA."""
    ca, cert, key = make_pki(tmp_path)
    link_key = tmp_path / "link.key"
    link_key.write_text("a link key of at least sixteen bytes")
    tls = {
        "api.tls.cert": cert,
        "api.tls.key": key,
        "rpc.tls.cert": cert,
        "rpc.tls.key": key,
        "rpc.tls.ca": ca,
        "rpc.key_file": link_key,
    }
    initial = tmp_path / "initial.safetensors"
    save_file({"layer/w": np.zeros((100, 10), np.float32), "layer/b": np.zeros(10, np.float32)},
              str(initial))  # fmt: skip
    aggregator = start_service("aggregator", tmp_path, {**tls, "model.initial_model": initial})
    coordinator = start_service(
        "coordinator",
        tmp_path,
        {
            **tls,
            "aggregator.rpc_address": aggregator.addresses["rpc"],
            "federation.rounds": 2,
            "federation.min_clients": 2,
        },
    )
    url = f"https://{coordinator.addresses['api']}"
    aggregator_url = f"https://{aggregator.addresses['api']}"
    try:
        # Plain HTTP to a TLS listener gets nowhere.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://{coordinator.addresses['api']}/v1/status", timeout=5)
        # A client that cannot verify the certificate (the system's roots) is refused by its
        # own TLS, and says why.
        with pytest.raises(rondo.NetworkError, match="CERTIFICATE_VERIFY_FAILED"):
            HttpClient().call("GET", f"{url}/v1/status", timeout=5)
        # The RPC listeners speak TLS only: a plain TCP peer gets no link handshake.
        host, port = aggregator.addresses["rpc"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as plain:
            plain.sendall(b"hello\n")
            plain.settimeout(5)
            try:
                answer = plain.recv(100)
            except OSError:
                answer = b""
        assert not answer.startswith(b"rondo"), answer
        # And speak it with certificates the test's CA signed.
        context = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host) as wrapped:
                assert wrapped.version() in ("TLSv1.2", "TLSv1.3")
        people = {"a": Adder(1.0, 10), "b": Adder(3.0, 30)}
        results: dict = {}

        def participate(name: str, person: Adder) -> None:
            results[name] = rondo.run_participant(
                person, url, heartbeat_period=0.2, name=name, ca_file=ca, connect_timeout=20
            )

        threads = [
            threading.Thread(target=participate, args=item, daemon=True) for item in people.items()
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        status = {}
        while time.monotonic() < deadline:
            status = requests.get(f"{url}/v1/status", verify=ca, timeout=5).json()
            if status["phase"] == "finished":
                break
            time.sleep(0.1)
        assert status.get("phase") == "finished", status
        for thread in threads:
            thread.join(timeout=20)
        assert {r.final_action for r in results.values()} == {"finish"}
        assert status["aggregator_url"] == aggregator_url
        model = requests.get(f"{aggregator_url}/v1/model", verify=ca, timeout=10)
        weights, _ = decode(model.content)
        np.testing.assert_allclose(weights["layer/w"], 2 * 2.5, rtol=1e-6)
    finally:
        coordinator.stop()
        aggregator.stop()
        for service in (coordinator, aggregator):
            print(f"----- {service.name} log -----\n{service.log.read_text()[-3000:]}")


def test_half_a_tls_setting_is_a_config_error(tmp_path):
    _, cert, _ = make_pki(tmp_path)
    with pytest.raises(RuntimeError, match=r"api\.tls\.key"):
        start_service("coordinator", tmp_path, {"api.tls.cert": cert})


def test_an_rpc_peer_with_a_certificate_from_another_ca_is_not_served(tmp_path):
    """The coordinator trusts only the CA it is given for the link: an aggregator whose RPC
    certificate another CA signed is never attached (the round never opens)."""
    ca, cert, key = make_pki(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_pki(other)
    aggregator = start_service(
        "aggregator", tmp_path, {"rpc.tls.cert": cert, "rpc.tls.key": key, "rpc.tls.ca": ca}
    )
    coordinator = start_service(
        "coordinator",
        tmp_path,
        {
            "aggregator.rpc_address": aggregator.addresses["rpc"],
            "rpc.tls.cert": cert,
            "rpc.tls.key": key,
            "rpc.tls.ca": other_ca,
        },
    )
    try:
        time.sleep(1.5)
        status = requests.get(f"{coordinator.url}/v1/status", timeout=5).json()
        assert status["phase"] == "waiting_for_aggregator", status
        assert status["aggregator"]["connected"] is False
        assert "certificate" in (status["aggregator"]["last_error"] or "").lower(), status
    finally:
        coordinator.stop()
        aggregator.stop()
