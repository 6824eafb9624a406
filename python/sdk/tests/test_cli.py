"""The ``rondo`` command line against the real services (the debug binaries that
``scripts/setup`` builds): status, history (table, JSON, CSV) and model download of a finished
federation, the errors an operator meets, and ``--help``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import rondo
from rondo import cli

ROOT = Path(__file__).resolve().parents[3]
BIN_DIR = Path(os.environ.get("RONDO_BIN_DIR", ROOT / "target" / "debug"))
ROUNDS = 2


def _start(binary: str, tmp: Path, settings: dict[str, object]) -> tuple[subprocess.Popen, str]:
    path = BIN_DIR / binary
    if not path.exists():
        pytest.skip(f"{path} is not built (scripts/setup)")
    addresses = tmp / f"{binary}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RONDO__")}
    env.update(
        {
            "RONDO__API__PORT": "0",
            "RONDO__RPC__PORT": "0",
            "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
        }
    )
    env.update({f"RONDO__{k.upper().replace('.', '__')}": str(v) for k, v in settings.items()})
    log = (tmp / f"{binary}.log").open("wb")
    process = subprocess.Popen([str(path)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not addresses.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{binary} did not start"
        time.sleep(0.02)
    return process, json.loads(addresses.read_text())["api"]


class Learner(rondo.Participant):
    def __init__(self, n: int) -> None:
        self.n = n

    def initial_weights(self) -> rondo.Weights:
        return {"dense/kernel": np.zeros((4, 2), np.float32), "dense/bias": np.zeros(2, np.float32)}

    def train_round(self, weights: rondo.Weights, round: int):
        return {k: v + 1 for k, v in weights.items()}, self.n, {"loss": 1.0 / round}

    def evaluate(self, weights: rondo.Weights, round: int):
        return 0.5, self.n, {}


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("cli")
    aggregator, agg_api = _start("aggregator", tmp, {})
    agg_rpc = json.loads((tmp / "aggregator.json").read_text())["rpc"]
    coordinator, coord_api = _start(
        "coordinator",
        tmp,
        {
            "aggregator.rpc_address": agg_rpc,
            "federation.rounds": ROUNDS,
            "federation.min_clients": 2,
        },
    )
    try:
        yield {"coordinator": f"http://{coord_api}", "aggregator": f"http://{agg_api}"}
    finally:
        for process in (coordinator, aggregator):
            process.terminate()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def finished(services) -> dict[str, str]:
    """The services once a federation of two participants has run its rounds."""
    # Before any participant: nothing to download yet (checked here, while it is true).
    code, _, err = run_cli("model", "download", services["aggregator"], "/dev/null", "--force")
    assert code == 1 and "no_model" in err
    threads = [
        threading.Thread(
            target=rondo.run_participant,
            args=(Learner(n), services["coordinator"]),
            kwargs={"heartbeat_period": 0.1, "name": f"p{n}"},
            daemon=True,
        )
        for n in (10, 30)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return services


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # argparse writes --help to sys.stdout and usage errors to sys.stderr.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv), out=out)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_status_of_a_finished_federation(finished):
    code, out, _ = run_cli("status", finished["coordinator"])
    assert code == 0
    # "label        value" lines, the labels in a column of 13.
    lines = {line[:13].strip(): line[13:] for line in out.splitlines() if line[:1].strip()}
    assert lines["phase"] == "finished"
    assert lines["round"] == f"{ROUNDS} of {ROUNDS} (attempt 0)"
    assert lines["participants"].startswith("2: 2 available, 0 selected")
    assert "connected" in lines["aggregator"] and f"model of round {ROUNDS}" in lines["aggregator"]
    assert lines["last round"] == (
        f"{ROUNDS} (attempt 0) aggregated (all_delivered): "
        f"round {ROUNDS}: 2 of 2 updates; every selected participant delivered"
    )

    code, out, _ = run_cli("status", finished["coordinator"], "--json")
    assert code == 0
    status = json.loads(out)
    assert status["phase"] == "finished" and status["aggregator"]["connected"] is True


def test_history_as_a_table_as_json_and_as_the_coordinators_csv(finished):
    code, out, _ = run_cli("history", finished["coordinator"])
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["round", "attempt", "outcome"]
    assert [row.split()[0] for row in rows] == [str(r) for r in range(ROUNDS + 1)]
    assert all(" aggregated " in row and " all_delivered " in row for row in rows), rows
    # Round r's training loss is 1/r, the mean of what both participants reported.
    assert rows[1].split()[7] == "1" and rows[2].split()[7] == "0.5"

    code, out, _ = run_cli("history", finished["coordinator"], "--json")
    assert code == 0
    assert [r["round"] for r in json.loads(out)] == list(range(ROUNDS + 1))

    code, out, _ = run_cli("history", finished["coordinator"], "--csv")
    assert code == 0
    assert out.encode() == fetch(f"{finished['coordinator']}/v1/history.csv")
    assert out.splitlines()[0].startswith("round,attempt,outcome,reason")


def test_model_download_writes_the_global_model(finished, tmp_path):
    target = tmp_path / "model.safetensors"
    code, out, _ = run_cli("model", "download", finished["aggregator"], str(target))
    assert code == 0, out
    assert f"round {ROUNDS}, 2 tensors" in out
    assert target.read_bytes() == fetch(f"{finished['aggregator']}/v1/model")
    weights = load_file(str(target))
    # Every round adds 1 to every weight: the weighted mean of two participants that agree.
    np.testing.assert_array_equal(weights["dense/kernel"], np.full((4, 2), ROUNDS, np.float32))
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind

    # The file is there: replaced only with --force.
    code, out, _ = run_cli("model", "download", finished["aggregator"], str(target))
    assert code == 1 and "--force" in out
    code, _, _ = run_cli(
        "model", "download", finished["aggregator"], str(target), "--force", "--round", str(ROUNDS)
    )
    assert code == 0
    # Asking for another round than the latest: refused, nothing written.
    other = tmp_path / "older.safetensors"
    code, out, _ = run_cli("model", "download", finished["aggregator"], str(other), "--round", "1")
    assert code == 1 and "keeps only the latest" in out and not other.exists()


def test_errors_an_operator_meets(services):
    # Nothing listens there: a network error, exit 1, a message that says so.
    code, _, err = run_cli("status", "http://127.0.0.1:9", "--timeout", "2")
    assert code == 1 and err.startswith("rondo: ") and "127.0.0.1:9" in err
    # A URL that is no URL: a usage error.
    code, _, err = run_cli("status", "localhost:8081")
    assert code == 2 and "not an http:// or https:// URL" in err
    # The aggregator's URL given where the coordinator's is wanted: the service's own refusal.
    code, _, err = run_cli("history", services["aggregator"])
    assert code == 1 and "unknown_route" in err


def test_help_reads_well():
    code, out, _ = run_cli("--help")
    assert code == 0
    help_text = cli.build_parser().format_help()
    for command in ("status", "history", "model"):
        assert f"    {command}" in help_text
    assert "examples:" in help_text and "Exit codes" in help_text
    for argv, expected in [
        (["status", "--help"], "COORDINATOR_URL"),
        (["history", "--help"], "--csv"),
        (["model", "download", "--help"], "AGGREGATOR_URL OUTPUT"),
    ]:
        code, out, _ = run_cli(*argv)
        assert code == 0 and expected in out and "--timeout SECS" in out, out
    code, _, err = run_cli("model")
    assert code == 2 and "required: download" in err


def test_the_console_script_is_installed():
    script = shutil.which("rondo", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the SDK is not installed with its scripts (scripts/setup)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"rondo {rondo.__version__}"
