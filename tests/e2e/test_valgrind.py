"""Both services' debug builds under valgrind's memcheck through a short federation: no
definite leak, no invalid access (RONDO_LONG_TESTS=1; a few minutes).

What docker/docker-compose-valgrind.yml does in containers, run here directly: each binary
under `valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=...` with
docker/valgrind.supp, SDK participants through a few rounds (with a refused upload and reads of
every status endpoint on the way), then SIGTERM: each service drains, exits, and valgrind's leak
check runs at exit. Memcheck's exit code says whether it found errors; its summary is read from
its log too, and printed.

    RONDO_LONG_TESTS=1 .venv/bin/python -m pytest -s tests/e2e/test_valgrind.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import BIN_DIR, ROOT, Service, _wait_for_file
from test_rounds import Adder, run_in_thread

from rondo.safetensors_io import encode

pytestmark = pytest.mark.skipif(
    not os.environ.get("RONDO_LONG_TESTS"), reason="set RONDO_LONG_TESTS=1"
)

# Memcheck's exit code when it found an error: distinct from the services' own (0, 1, 2).
ERROR_EXIT = 99
SUPPRESSIONS = ROOT / "docker" / "valgrind.supp"


def start_under_valgrind(binary: str, tmp: Path, settings: dict[str, object]) -> Service:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed (scripts/setup --test-tools)")
    addresses = tmp / f"{binary}.addresses.json"
    log = tmp / f"{binary}.log"
    report = tmp / f"{binary}.valgrind"
    env = dict(os.environ)
    env.update(
        {
            "RONDO__API__PORT": "0",
            "RONDO__RPC__PORT": "0",
            "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
            "RUST_LOG": "info,tarpc=warn",
            # An embedded Python aggregator would allocate through malloc, which memcheck
            # tracks, instead of pymalloc's arenas, which it reports as errors.
            "PYTHONMALLOC": "malloc",
        }
    )
    env.update({f"RONDO__{k.upper().replace('.', '__')}": str(v) for k, v in settings.items()})
    command = [
        valgrind,
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        f"--error-exitcode={ERROR_EXIT}",
        "--num-callers=40",
        f"--suppressions={SUPPRESSIONS}",
        f"--log-file={report}",
        str(BIN_DIR / binary),
        "-c",
        str(ROOT / "configs" / f"dev-{binary}.toml"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    # Under valgrind a debug build takes seconds to start: the shared 30 s wait is enough.
    return Service(binary, process, _wait_for_file(addresses, process, log), log)


def stop_and_read(service: Service, tmp: Path) -> tuple[int, str]:
    """SIGTERM, then wait for the drain and valgrind's leak check; its exit code and report."""
    service.process.terminate()
    try:
        code = service.process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()
        pytest.fail(f"{service.name} did not exit under valgrind within 180 s of SIGTERM")
    return code, (tmp / f"{service.name}.valgrind").read_text(errors="replace")


def leak_summary(report: str) -> dict[str, int]:
    """Bytes per leak kind from memcheck's LEAK SUMMARY, and the error count."""
    summary = {}
    for kind in ("definitely lost", "indirectly lost", "possibly lost", "still reachable"):
        m = re.search(rf"{kind}: ([\d,]+) bytes", report)
        summary[kind] = int(m.group(1).replace(",", "")) if m else 0
    errors = re.findall(r"ERROR SUMMARY: ([\d,]+) errors", report)
    assert errors, f"no ERROR SUMMARY in the report:\n{report[-3000:]}"
    summary["errors"] = int(errors[-1].replace(",", ""))
    summary["suppressed"] = sum(
        int(n.replace(",", "")) for n in re.findall(r"suppressed: ([\d,]+) bytes", report)
    )
    return summary


def test_no_definite_leak_in_either_service(tmp_path):
    aggregator = start_under_valgrind("aggregator", tmp_path, {"link.call_timeout_secs": 30})
    coordinator = start_under_valgrind(
        "coordinator",
        tmp_path,
        {
            "aggregator.rpc_address": aggregator.addresses["rpc"],
            "aggregator.call_timeout_secs": 30,
            "federation.rounds": 3,
            "federation.min_clients": 3,
            # Everything runs 20-50x slower under valgrind: heartbeats come late.
            "federation.heartbeat_timeout_secs": 60,
            "federation.round_timeout_secs": 120,
        },
    )
    try:
        url = f"http://{coordinator.addresses['api']}"
        people = {"a": Adder(1.0, 10), "b": Adder(2.0, 20), "c": Adder(3.0, 30)}
        reports: dict = {}
        threads = [run_in_thread(p, url, name, reports) for name, p in people.items()]

        # A refused upload on the way (a wrong token): the error paths are checked too.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if requests.get(f"{url}/v1/status", timeout=30).json()["round"] >= 1:
                break
            time.sleep(0.5)
        agg_url = f"http://{aggregator.addresses['api']}"
        bad = encode({"layer/w": np.zeros((100, 10), np.float32)}, {"rondo.n_samples": "1"})
        refused = requests.post(
            f"{agg_url}/v1/rounds/1/update",
            data=bad,
            headers={"Authorization": "Bearer " + "0" * 64},
            timeout=60,
        )
        assert refused.status_code == 401, refused.text
        for path in ("/", "/v1/history", "/v1/history.csv", "/metrics"):
            assert requests.get(f"{url}{path}", timeout=60).status_code == 200

        for thread in threads:
            thread.join(timeout=300)
        assert {r.final_action for r in reports.values()} == {"finish"}, reports
        status = requests.get(f"{url}/v1/status", timeout=30).json()
        assert status["phase"] == "finished"
        assert requests.get(f"{agg_url}/metrics", timeout=60).status_code == 200
    finally:
        results = {}
        for service in (coordinator, aggregator):
            if service.process.poll() is None:
                results[service.name] = stop_and_read(service, tmp_path)
            else:
                report = (tmp_path / f"{service.name}.valgrind").read_text(errors="replace")
                results[service.name] = (service.process.returncode, report)
    for name, (code, report) in results.items():
        summary = leak_summary(report)
        print(f"{name}: exit {code}, {json.dumps(summary)}")
        assert summary["definitely lost"] == 0, f"{name} leaked:\n{report[-6000:]}"
        assert summary["errors"] == 0, f"{name}: memcheck errors:\n{report[-6000:]}"
        assert code == 0, f"{name} exited {code}:\n{report[-4000:]}"
