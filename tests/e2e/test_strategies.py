"""Every native aggregation rule, run by the real aggregator, against numpy written from its
paper, and the robust ones against Byzantine participants.

Each case runs one federation of manual participants (``Person``) on a small two-tensor
float32 model for three rounds: round 1 with honest updates around the previous model, round 2
with two participants sending honest updates scaled by 1e6, round 3 with two sending random
noise of large norm. Every round's global model must match the reference (relative 1e-5); in
rounds 2 and 3 the robust rules must also stay within 1% (relative L2) of the honest
participants' average, and FedAvg must not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from safetensors.numpy import save_file
from test_bad_input import Person, upload_bytes

from rondo.safetensors_io import decode

SHAPES = {"dense/kernel": (4, 37), "dense/bias": (5,)}
ROUNDS = 3
BYZANTINE = 2


def flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[name].astype(np.float64).ravel() for name in SHAPES])


def unflat(values: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        out[name] = values[at : at + size].reshape(shape).astype(np.float32)
        at += size
    return out


# --- references, from the papers ------------------------------------------------------------


def fedavg(x, updates, n):
    return np.average(updates, axis=0, weights=n)


def median(x, updates, n):
    return np.median(updates, axis=0)


def trimmed_mean(x, updates, n, beta=0.1):
    k = math.floor(beta * len(updates))
    ordered = np.sort(updates, axis=0)
    return ordered[k : len(updates) - k].mean(axis=0)


def krum_scores(updates, f):
    d = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(axis=2)
    neighbours = len(updates) - f - 2
    return np.array([np.sort(np.delete(d[i], i))[:neighbours].sum() for i in range(len(updates))])


def krum(x, updates, n, f=1):
    return updates[np.argmin(krum_scores(updates, f))]


def multi_krum(x, updates, n, f=1, m=None):
    m = len(updates) - f if m is None else m
    return updates[np.argsort(krum_scores(updates, f), kind="stable")[:m]].mean(axis=0)


def bulyan(x, updates, n, f=1):
    remaining = list(range(len(updates)))
    selected = []
    for _ in range(len(updates) - 2 * f):
        scores = krum_scores(updates[remaining], f)
        selected.append(remaining.pop(int(np.argmin(scores))))
    chosen = updates[selected]
    beta = len(selected) - 2 * f
    centre = np.median(chosen, axis=0)
    closest = np.argsort(np.abs(chosen - centre), axis=0, kind="stable")[:beta]
    return np.take_along_axis(chosen, closest, axis=0).mean(axis=0)


@dataclass
class ServerOptimizer:
    """FedAvgM (Hsu et al. 2019) and FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021, Alg. 2),
    stepping on the sample-weighted average's pseudo-gradient."""

    kind: str
    options: dict[str, float]
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    defaults: dict[str, float] = field(default_factory=dict)

    def option(self, name: str, default: float) -> float:
        return self.options.get(name, default)

    def __call__(self, x, updates, n):
        delta = np.average(updates, axis=0, weights=n) - x
        if self.kind == "fedavgm":
            eta, beta = self.option("eta", 1.0), self.option("beta", 0.9)
            self.m = delta if self.m is None else beta * self.m + delta
            return x + eta * self.m
        eta, beta1, beta2 = self.option("eta", 0.1), self.option("beta1", 0.9), 0.99
        beta2, tau = self.option("beta2", beta2), self.option("tau", 1e-3)
        if self.m is None:
            self.m, self.v = np.zeros_like(x), np.full_like(x, tau * tau)
        self.m = beta1 * self.m + (1 - beta1) * delta
        square = delta * delta
        if self.kind == "fedadagrad":
            self.v = self.v + square
        elif self.kind == "fedadam":
            self.v = beta2 * self.v + (1 - beta2) * square
        else:  # fedyogi
            self.v = self.v - (1 - beta2) * square * np.sign(self.v - square)
        return x + eta * self.m / (np.sqrt(self.v) + tau)


ROBUST = {"median", "trimmed_mean", "krum", "multi_krum", "bulyan"}


@dataclass
class Case:
    strategy: str
    options: dict[str, float]
    participants: int = 10

    def reference(self):
        if self.strategy in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
            return ServerOptimizer(self.strategy, self.options)
        rule = globals()[self.strategy]
        return lambda x, updates, n: rule(x, updates, n, **self.options)


CASES = [
    Case("fedavg", {}),
    Case("median", {}),
    Case("trimmed_mean", {"beta": 0.2}),
    Case("krum", {"f": 2}),
    Case("multi_krum", {"f": 2}),
    Case("multi_krum", {"f": 2, "m": 3}),
    # Bulyan needs n >= 4f + 3 updates: 11 for f = 2.
    Case("bulyan", {"f": 2}, participants=11),
    Case("fedavgm", {}),
    Case("fedavgm", {"eta": 0.5, "beta": 0.5}),
    Case("fedadam", {}),
    Case("fedadam", {"eta": 0.05, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}),
    Case("fedyogi", {}),
    Case("fedadagrad", {"tau": 1e-2}),
]


def round_updates(rng, x, round_: int, participants: int):
    """(updates, sample counts, indexes of the honest ones) of a round."""
    dim = len(x)
    if round_ == 1:  # honest: a local step away from the global model
        updates = x + rng.normal(0.0, 0.1, (participants, dim))
        return updates, rng.integers(1, 100, participants), list(range(participants))
    honest = 1.0 + rng.normal(0.0, 0.002, (participants, dim))
    if round_ == 2:  # the attackers send honest-looking updates scaled by 1e6
        honest[:BYZANTINE] *= 1e6
    else:  # the attackers send noise of large norm
        honest[:BYZANTINE] = rng.normal(0.0, 1e4, (BYZANTINE, dim))
    return honest, np.full(participants, 10), list(range(BYZANTINE, participants))


def model(federation) -> tuple[int, np.ndarray]:
    answer = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    answer.raise_for_status()
    tensors, _ = decode(answer.content)
    return int(answer.headers["x-rondo-round"]), flat(tensors)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.strategy}-{c.options}")
def test_the_rule_matches_its_paper_and_the_robust_ones_resist_attackers(
    case: Case, start_federation, tmp_path
):
    rng = np.random.default_rng(7)
    dim = sum(math.prod(s) for s in SHAPES.values())
    initial = tmp_path / "initial.safetensors"
    save_file(unflat(rng.normal(0.0, 1.0, dim)), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": ROUNDS,
            "federation.min_clients": case.participants,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={
            "model.initial_model": initial,
            "aggregation.strategy": case.strategy,
            **{f"aggregation.options.{k}": v for k, v in case.options.items()},
        },
    )
    people = [Person(federation.coordinator_url, f"p{i}") for i in range(case.participants)]
    reference = case.reference()
    _, x = model(federation)
    for round_ in range(1, ROUNDS + 1):
        federation.wait_for(
            lambda s, r=round_: s["phase"] == "training" and s["round"] == r,
            what=f"round {round_} to open",
        )
        tickets = [p.post("start_training").json() for p in people]
        updates, n, honest = round_updates(rng, x, round_, case.participants)
        # Updates travel as float32: the reference sees what the aggregator sees.
        updates = updates.astype(np.float32).astype(np.float64)
        for ticket, update, count in zip(tickets, updates, n, strict=True):
            answer = requests.post(
                ticket["upload_url"],
                data=upload_bytes(unflat(update), n_samples=str(count)),
                headers={"Authorization": f"Bearer {ticket['token']}"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
        status = federation.wait_for(
            lambda s, r=round_: any(e["round"] == r and e["outcome"] for e in s["history"]),
            what=f"round {round_} to close",
        )
        entry = next(e for e in status["history"] if e["round"] == round_)
        assert entry["outcome"] == "aggregated", entry
        got_round, got = model(federation)
        assert got_round == round_
        # Ties (Krum's scores are symmetric: two mutually nearest updates tie with one
        # neighbour) go to the lowest participant id, as the aggregator orders updates.
        order = np.argsort([p.id for p in people], kind="stable")
        expected = reference(x, updates[order], n[order].astype(np.float64))
        np.testing.assert_allclose(
            got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=f"round {round_}"
        )
        if round_ > 1:
            honest_mean = updates[honest].mean(axis=0)
            error = np.linalg.norm(got - honest_mean) / np.linalg.norm(honest_mean)
            if case.strategy in ROBUST:
                assert error < 0.01, f"round {round_}: {error:.3g} from the honest average"
            elif case.strategy == "fedavg":
                assert error > 1.0, f"round {round_}: FedAvg resisted ({error:.3g})?"
        x = got


def test_a_rule_that_cannot_run_fails_the_round_and_the_model_stays(start_federation, tmp_path):
    """Krum with f = 1 needs more than 2f + 2 = 4 updates: a round of 3 fails with that reason
    and the previous model stays; the aggregator keeps serving."""
    dim = sum(math.prod(s) for s in SHAPES.values())
    initial = tmp_path / "initial.safetensors"
    save_file(unflat(np.zeros(dim)), str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 3,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={"model.initial_model": initial, "aggregation.strategy": "krum"},
    )
    people = [Person(federation.coordinator_url, f"p{i}") for i in range(3)]
    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    for person in people:
        ticket = person.post("start_training").json()
        answer = requests.post(
            ticket["upload_url"],
            data=upload_bytes(unflat(np.ones(dim))),
            headers={"Authorization": f"Bearer {ticket['token']}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    status = federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] for e in s["history"]),
        what="round 1 to close",
    )
    entry = next(e for e in status["history"] if e["round"] == 1)
    assert entry["outcome"] == "failed", entry
    assert "more than 2f + 2" in entry["reason"], entry
    assert model(federation)[0] == 0, "the previous model stays"
