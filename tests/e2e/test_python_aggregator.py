"""Python aggregators (`strategy = "python"`) in the real aggregator binary.

- The Python weighted average (`rondo_aggregators.weighted_average.WeightedAverage`) makes the
  same global models as native `fedavg` from the same federation.
- A rule that fails fails the round, never the process: each way a Python rule can fail
  (`python_aggregators/faulty.py`: raising in any call, a result with wrong names, shapes or
  dtypes, NaN, a call past `timeout_secs`) fails that round with the reason in the
  coordinator's history and the aggregator's log; the aggregator keeps serving, and the retried
  round aggregates from the last good model.
- A rule that cannot be loaded stops the aggregator at start-up: exit code 2, one line.
- With RONDO_LONG_TESTS=1: 500 rounds of a 1 MB model, the aggregator's RSS flat.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import BIN_DIR, ROOT
from safetensors.numpy import save_file
from test_bad_input import Person, upload_bytes

import rondo
from rondo.safetensors_io import decode

HERE = Path(__file__).resolve().parent
# The venv running the tests (scripts/setup's .venv) has rondo_aggregators installed; the
# test rules live next to this file.
PYTHON = {
    "aggregation.strategy": "python",
    "aggregation.python.venv": sys.prefix,
}
PYTHON_ENV = {"PYTHONPATH": str(HERE / "python_aggregators")}
SHAPES = {"dense/kernel": (40, 25), "dense/bias": (25,)}


def start_with_env(start_federation, env: dict[str, str], **kwargs):
    """`start_federation` with extra environment variables for both services."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start_federation(**kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Noisy(rondo.Participant):
    """Participant `index`: shrinks the model a little and adds noise drawn from a generator
    seeded by (index, round), so every run of the federation gets the same updates. Values stay
    in about [1, 2]: no sum cancels, so the float32 sums of native fedavg and the float64 ones
    of the Python average agree to a few float32 ulps, value by value."""

    def __init__(self, index: int) -> None:
        self.index = index

    def initial_weights(self) -> rondo.Weights:
        raise AssertionError("the aggregator starts from its initial model")

    def train_round(self, weights: rondo.Weights, round: int):
        rng = np.random.default_rng([self.index, round])
        new = {
            name: (w * np.float32(1 - 0.01 * self.index) + rng.uniform(0, 0.1, w.shape)).astype(
                w.dtype
            )
            for name, w in weights.items()
        }
        return new, 10 * (self.index + 1), {"loss": float(self.index)}


def final_model(start_federation, tmp_path: Path, aggregator: dict) -> dict[str, np.ndarray]:
    """Runs 4 Noisy participants through 3 rounds; returns the last global model."""
    rng = np.random.default_rng(0)
    initial = tmp_path / f"initial-{len(list(tmp_path.iterdir()))}.safetensors"
    save_file({k: rng.uniform(1, 2, s).astype(np.float32) for k, s in SHAPES.items()}, str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 3,
            "federation.min_clients": 4,
            "federation.heartbeat_period_secs": 0.2,
            "federation.heartbeat_timeout_secs": 30,
        },
        aggregator={"model.initial_model": initial, **aggregator},
    )
    threads = [
        threading.Thread(
            target=rondo.run_participant,
            args=(Noisy(i), federation.coordinator_url),
            kwargs={"heartbeat_period": 0.05, "name": f"p{i}"},
            daemon=True,
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    for thread in threads:
        thread.join(timeout=10)
    assert [e["outcome"] for e in status["history"]] == ["aggregated"] * 3
    assert all(len(e["delivered"]) == 4 for e in status["history"])
    response = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert response.headers["x-rondo-round"] == "3"
    federation.stop()
    return decode(response.content)[0]


def test_python_weighted_average_matches_native_fedavg(start_federation, tmp_path):
    native = final_model(start_federation, tmp_path, {})
    python = final_model(
        start_federation,
        tmp_path,
        {**PYTHON, "aggregation.python.module": "rondo_aggregators.weighted_average"},
    )
    assert set(python) == set(native) == set(SHAPES)
    for name, want in native.items():
        assert python[name].dtype == want.dtype == np.float32
        np.testing.assert_allclose(python[name], want, rtol=1e-6)
        assert not np.allclose(want, want.flat[0]), "a model worth comparing"


# --- a rule that fails fails the round ------------------------------------------------------

FAILURES = [
    # (faulty.MODES number, what the round's reason must say)
    (1, "start_round raised RuntimeError: start_round refuses round 1"),
    (2, "add_update raised KeyError: 'no room for"),
    (3, "finish_round raised ValueError: the average is not good enough"),
    (4, "finish_round returned no tensor `dense/bias`"),
    (5, "finish_round returned tensor `surprise`, which is not part of the model"),
    (6, "finish_round returned tensor `dense/bias` with shape [26], the model's is [25]"),
    (7, "finish_round returned tensor `dense/bias` with dtype float64, the model's is float32"),
    (8, "finish_round returned a model that is not finite (tensor `dense/bias`"),
    (9, "finish_round ran past aggregation.python.timeout_secs (1 s) and was interrupted"),
    (10, "add_update ran past aggregation.python.timeout_secs (1 s) and was interrupted"),
    (11, "finish_round returned list, not a mapping of tensor names to numpy arrays"),
    (12, "finish_round ran past aggregation.python.timeout_secs (1 s) and was interrupted"),
]


def upload(ticket: dict, value: float, n_samples: int) -> requests.Response:
    return requests.post(
        ticket["upload_url"],
        data=upload_bytes(
            {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}, n_samples=str(n_samples)
        ),  # fmt: skip
        headers={"Authorization": f"Bearer {ticket['token']}"},
        timeout=30,
    )


def faulty_round_one(start_federation, tmp_path, fail: int):
    initial = tmp_path / "initial.safetensors"
    save_file({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, str(initial))
    federation = start_with_env(
        start_federation,
        PYTHON_ENV,
        coordinator={
            "federation.rounds": 2,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={
            **PYTHON,
            "model.initial_model": initial,
            "aggregation.python.module": "faulty",
            "aggregation.python.class": "Faulty",
            "aggregation.python.timeout_secs": 1,
            "aggregation.options.fail": fail,
        },
    )
    a = Person(federation.coordinator_url, "a")
    b = Person(federation.coordinator_url, "b")
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    return federation, a, b


@pytest.mark.parametrize(("fail", "reason"), FAILURES, ids=[str(f) for f, _ in FAILURES])
def test_a_failing_python_rule_fails_the_round_and_the_retry_aggregates(
    start_federation, tmp_path, fail, reason
):
    federation, a, b = faulty_round_one(start_federation, tmp_path, fail)
    tickets = {p.id: p.post("start_training").json() for p in (a, b)}
    # The uploads themselves are accepted: Python's verdict comes with the round.
    assert upload(tickets[a.id], 3.0, 1).status_code == 200
    assert upload(tickets[b.id], 3.0, 1).status_code == 200
    status = federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] for e in s["history"]),
        timeout=30,
        what="round 1 attempt 0 to close",
    )
    first = next(e for e in status["history"] if e["round"] == 1)
    assert first["outcome"] == "failed", first
    assert "Python aggregator faulty.Faulty: " in first["reason"], first
    assert reason in first["reason"], first
    assert reason in federation.aggregator.log.read_text(errors="replace")

    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert model.headers["x-rondo-round"] == "0", "the previous model stays"

    # The aggregator still serves; the round runs again and aggregates from the last good
    # model, the rule starting it afresh.
    federation.wait_for(
        lambda s: s["phase"] == "training" and s["attempt"] == 1, what="round 1 attempt 1"
    )
    again = {p.id: p.post("start_training").json() for p in (a, b)}
    assert upload(again[a.id], 1.0, 1).status_code == 200
    assert upload(again[b.id], 5.0, 3).status_code == 200
    federation.wait_for(
        lambda s: any(
            e["round"] == 1 and e["attempt"] == 1 and e["outcome"] == "aggregated"
            for e in s["history"]
        ),
        timeout=30,
        what="round 1 attempt 1 to aggregate",
    )
    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert model.headers["x-rondo-round"] == "1"
    tensors, _ = decode(model.content)
    assert all(np.all(t == 4.0) for t in tensors.values())
    assert federation.aggregator.process.poll() is None


def test_a_bf16_model_without_ml_dtypes_fails_the_round_with_the_reason(start_federation, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    initial = tmp_path / "initial.safetensors"
    bf16 = {k: np.zeros(s, ml_dtypes.bfloat16) for k, s in SHAPES.items()}
    initial.write_bytes(upload_bytes(bf16, n_samples=None))
    federation = start_with_env(
        start_federation,
        PYTHON_ENV,
        coordinator={"federation.rounds": 1, "federation.min_clients": 2},
        aggregator={
            **PYTHON,
            "model.initial_model": initial,
            "aggregation.python.module": "faulty",
            "aggregation.python.class": "Faulty",
            "aggregation.options.hide_ml_dtypes": 1,
        },
    )
    people = [Person(federation.coordinator_url, name) for name in ("a", "b")]
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    for person in people:
        ticket = person.post("start_training").json()
        response = requests.post(
            ticket["upload_url"],
            data=upload_bytes({k: np.ones(s, ml_dtypes.bfloat16) for k, s in SHAPES.items()}),
            headers={"Authorization": f"Bearer {ticket['token']}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    status = federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] for e in s["history"]),
        what="round 1 to close",
    )
    first = next(e for e in status["history"] if e["round"] == 1)
    assert first["outcome"] == "failed", first
    assert (
        "the model has BF16 tensors, which reach Python as ml_dtypes.bfloat16 arrays, and "
        "ml_dtypes cannot be imported" in first["reason"]
    ), first
    assert federation.aggregator_status()["model"]["round"] == 0


# --- a rule that cannot be loaded stops the aggregator --------------------------------------

STARTUP_FAILURES = [
    # (module, class, options, venv, what the one line must say)
    ("no_such_module", "X", {}, None,
     "cannot import module no_such_module: ModuleNotFoundError: No module named 'no_such_module'"),
    ("faulty", "Missing", {}, None, "module faulty has no attribute Missing"),
    ("faulty", "NotAnAggregator", {}, None,
     "faulty.NotAnAggregator is not a subclass of rondo_aggregators.Aggregator"),
    ("faulty", "BrokenInit", {}, None, "raised RuntimeError: cannot start: no licence"),
    ("faulty", "Faulty", {"frobnicate": 1}, None,
     "faulty.Faulty(**{frobnicate: 1}) raised TypeError:"),
    ("rondo_aggregators.trimmed_mean", "TrimmedMean", {"beta": 0.7}, None,
     "raised ValueError: option beta = 0.7 must be in [0, 0.5)"),
    ("faulty", "BadHoldsUpdates", {}, None, "faulty.BadHoldsUpdates.holds_updates must be a bool"),
    ("rondo_aggregators.weighted_average", "WeightedAverage", {}, "/nonexistent/venv",
     "aggregation.python.venv = \"/nonexistent/venv\": "
     "/nonexistent/venv/lib/python3"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "class_", "options", "venv", "message"),
    STARTUP_FAILURES,
    ids=[f"{m}.{c}" + (f"-{v}" if v else "") for m, c, _, v, _ in STARTUP_FAILURES],
)
def test_a_rule_that_cannot_be_loaded_stops_the_aggregator_at_start_up(
    tmp_path, module, class_, options, venv, message
):
    env = {
        **os.environ,
        **PYTHON_ENV,
        "RONDO__API__PORT": "0",
        "RONDO__RPC__PORT": "0",
        "RONDO__AGGREGATION__STRATEGY": "python",
        "RONDO__AGGREGATION__PYTHON__VENV": venv or sys.prefix,
        "RONDO__AGGREGATION__PYTHON__MODULE": module,
        "RONDO__AGGREGATION__PYTHON__CLASS": class_,
        **{f"RONDO__AGGREGATION__OPTIONS__{k.upper()}": str(v) for k, v in options.items()},
    }
    result = subprocess.run(
        [str(BIN_DIR / "aggregator"), "-c", str(ROOT / "configs" / "dev-aggregator.toml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "panicked" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"aggregator: invalid config: aggregation.python ({module}.{class_}): ")
    assert message in line, line


# --- memory over many rounds ----------------------------------------------------------------


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@pytest.mark.skipif(os.environ.get("RONDO_LONG_TESTS") != "1", reason="RONDO_LONG_TESTS=1")
def test_500_rounds_of_a_1_mb_model_through_python_keep_the_aggregator_rss_flat(
    start_federation, tmp_path
):
    rounds, n = 500, (1 << 20) // 4
    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(n, np.float32)}, str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": rounds,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 600,
        },
        aggregator={
            **PYTHON,
            "model.initial_model": initial,
            "aggregation.python.module": "rondo_aggregators.weighted_average",
        },
    )
    people = [Person(federation.coordinator_url, name) for name in ("a", "b")]
    bodies = [upload_bytes({"w": np.full(n, v, np.float32)}, n_samples="1") for v in (1.0, 3.0)]
    pid = federation.aggregator.process.pid
    samples: dict[int, int] = {}
    session = requests.Session()
    started = time.monotonic()
    for round_ in range(1, rounds + 1):
        for person, body in zip(people, bodies, strict=True):
            while True:
                action = person.post("heartbeat").json()
                if action["action"] == "train" and action["round"] == round_:
                    break
                time.sleep(0.002)
            ticket = person.post("start_training").json()
            response = session.post(
                ticket["upload_url"],
                data=body,
                headers={"Authorization": f"Bearer {ticket['token']}"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        samples[round_] = rss_kib(pid)
    elapsed = time.monotonic() - started
    status = federation.wait_for(lambda s: s["phase"] == "finished", what="all rounds")
    assert all(e["outcome"] == "aggregated" for e in status["history"])
    after_warmup = [kib for r, kib in samples.items() if r > 20]
    low, high = min(after_warmup), max(after_warmup)
    print(
        f"\n{rounds} rounds of a 1 MiB model through the Python weighted average in "
        f"{elapsed:.1f} s; aggregator RSS at round 1 {samples[1] / 1024:.1f} MiB, round 21 "
        f"{samples[21] / 1024:.1f} MiB, rounds 21-{rounds}: min {low / 1024:.1f}, max "
        f"{high / 1024:.1f}, last {samples[rounds] / 1024:.1f} MiB"
    )
    assert high <= 1.10 * low, (low, high)
    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert np.all(decode(model.content)[0]["w"] == 2.0)
