"""The example participants against the real binaries: real models learn.

- House prices (Keras on JAX): a short federation of three `run-participant` processes (3
  rounds of 3 local epochs), scored by `house-prices-report` with Keras on the held-out test
  set. The final global model must beat the mean predictor by a clear margin: test RMSLE
  below 60% of the mean predictor's (about 0.41; runs here give about 0.14).
- Digits (scikit-learn): four participants for 5 rounds; the final global model reaches at
  least 90% test accuracy (runs here give 94-96%), and the centrally trained one is within a
  few points of it.

Both need the examples installed (`scripts/setup --examples`; scripts/test does it) and are
skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOUSE_PRICES_PARTICIPANTS = 3


def needs(*modules: str) -> None:
    # Looked up, not imported: the examples run in their own processes, and importing Keras
    # here would cost seconds (and, without KERAS_BACKEND, look for TensorFlow).
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run scripts/setup --examples")


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"})
    return env


def wait_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


def test_house_prices_federation_beats_the_mean_predictor(start_federation, tmp_path: Path):
    needs("keras_house_prices", "keras", "jax", "matplotlib", "tqdm")
    data_dir = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "keras_house_prices.split", "--data-directory", str(data_dir),
         "--number-of-participants", str(HOUSE_PRICES_PARTICIPANTS), "--seed", "1"],
        check=True, timeout=120,
    )  # fmt: skip
    federation = start_federation(
        coordinator={
            "federation.rounds": 3,
            "federation.min_clients": HOUSE_PRICES_PARTICIPANTS,
            # Keras compiles its training step in each process at once, on two cores.
            "federation.heartbeat_timeout_secs": 30,
            "federation.round_timeout_secs": 300,
        }
    )
    logs = []
    participants = []
    for k in range(HOUSE_PRICES_PARTICIPANTS):
        log = (tmp_path / f"participant-{k}.log").open("wb")
        logs.append(log)
        participants.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "keras_house_prices.participant",
                    "--data-directory",
                    str(data_dir),
                    "--coordinator-url",
                    federation.coordinator_url,
                    "--epochs",
                    "3",
                    "--no-progress",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=example_env(),
            )  # fmt: skip
        )
    results_file = tmp_path / "results.json"
    report = subprocess.run(
        [sys.executable, "-m", "keras_house_prices.report", "--data-directory", str(data_dir),
         "--coordinator-url", federation.coordinator_url, "--epochs", "3",
         "--plot", str(tmp_path / "loss.png"), "--results", str(results_file),
         "--no-progress", "--timeout", "400"],
        capture_output=True, text=True, env=example_env(), timeout=600,
    )  # fmt: skip
    codes = wait_all(participants, timeout=60)
    for log in logs:
        log.close()
    participant_logs = "\n".join(
        (tmp_path / f"participant-{k}.log").read_text(errors="replace")
        for k in range(HOUSE_PRICES_PARTICIPANTS)
    )
    assert report.returncode == 0, report.stdout + report.stderr + participant_logs
    assert codes == [0] * HOUSE_PRICES_PARTICIPANTS, participant_logs
    # Each participant claimed a shard of its own.
    claimed = sorted(line.split()[1] for line in participant_logs.splitlines()
                     if line.startswith("shard ") and " of " in line)  # fmt: skip
    assert claimed == [str(k) for k in range(HOUSE_PRICES_PARTICIPANTS)]

    results = json.loads(results_file.read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert all(r["participants"] == HOUSE_PRICES_PARTICIPANTS for r in results["rounds"])
    assert results["final_model_round"] == 3
    fed, mean = results["federated_test_rmsle"], results["mean_predictor_test_rmsle"]
    assert fed < 0.6 * mean, results
    # The global model the participants received got better from round 1 to round 3.
    assert results["rounds"][-1]["global_val_loss"] < results["rounds"][0]["global_val_loss"]
    assert results["central_epochs"] == 9 and results["central_test_rmsle"] < 0.6 * mean
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert "federated / central" in report.stdout


def test_sklearn_digits_federation_reaches_90_percent(start_federation, tmp_path: Path):
    needs("sklearn_digits", "sklearn")
    n = 4
    federation = start_federation(coordinator={"federation.min_clients": n})  # 5 rounds
    results_file = tmp_path / "results.json"
    report = subprocess.run(
        [sys.executable, "-m", "sklearn_digits.report", "--number-of-participants", str(n),
         "--coordinator-url", federation.coordinator_url, "--results", str(results_file),
         "--with-participants", "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr
    lines = report.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == [
        f"round {r}/5" for r in range(1, 6)
    ]
    results = json.loads(results_file.read_text())
    assert results["final_model_round"] == 5
    assert results["federated_test_accuracy"] >= 0.90, results
    assert abs(results["federated_test_accuracy"] - results["central_test_accuracy"]) < 0.05
    # The per-round figures are sample-weighted means of what the participants reported.
    status = federation.status()
    record = next(r for r in status["history"] if r["round"] == 5 and r["outcome"] == "aggregated")
    deliveries = record["deliveries"]
    expected = sum(d["n_samples"] * d["metrics"]["accuracy"] for d in deliveries) / sum(
        d["n_samples"] for d in deliveries
    )
    assert results["rounds"][-1]["accuracy"] == pytest.approx(expected)
