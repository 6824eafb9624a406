"""The reference aggregators against formulas written out by hand, on random updates."""

from __future__ import annotations

import numpy as np
import pytest

from rondo_aggregators import Aggregator, Update
from rondo_aggregators.base import BLOCK
from rondo_aggregators.fedadam import FedAdam
from rondo_aggregators.krum import Krum
from rondo_aggregators.median import Median
from rondo_aggregators.trimmed_mean import TrimmedMean
from rondo_aggregators.weighted_average import WeightedAverage

SHAPES = {"dense/kernel": (5, 3), "dense/bias": (3,), "scale": ()}


def read_only(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the aggregator hands over: read-only arrays."""
    for array in weights.values():
        array.flags.writeable = False
    return weights


def random_updates(rng: np.random.Generator, n: int, dtype=np.float32) -> list[Update]:
    return [
        Update(
            participant_id=f"p{i}",
            weights=read_only({k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}),
            n_samples=int(rng.integers(1, 100)),
            metrics={"loss": float(i)},
        )
        for i in range(n)
    ]


def run_round(rule: Aggregator, updates: list[Update], global_model=None, round: int = 1):
    rule.start_round(round, global_model)
    for update in updates:
        rule.add_update(update)
    return rule.finish_round()


def assert_close(got, want, rtol=1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        # An array of the tensor's shape, even for a 0-d tensor (not a numpy scalar).
        assert isinstance(got[name], np.ndarray), (name, type(got[name]))
        assert got[name].shape == np.shape(want[name]), name
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=rtol)


def test_weighted_average_is_the_sample_weighted_mean_in_the_models_dtype():
    rng = np.random.default_rng(1)
    rule = WeightedAverage()
    assert rule.holds_updates is False
    for round in (1, 2):  # a second round starts afresh
        updates = random_updates(rng, 7)
        model = run_round(rule, updates, round=round)
        total = sum(u.n_samples for u in updates)
        want = {
            k: sum(u.n_samples * u.weights[k].astype(np.float64) for u in updates) / total
            for k in SHAPES
        }
        assert_close(model, want)
        assert all(model[k].dtype == np.float32 and model[k].shape == s for k, s in SHAPES.items())


def test_weighted_average_of_tensors_larger_than_a_block_is_exact_too():
    # Large tensors are summed block by block, in parts on several threads.
    rng = np.random.default_rng(8)
    size = 5 * BLOCK + 123
    updates = [
        Update(f"p{i}", read_only({"big": rng.normal(size=size).astype(np.float32)}), i + 1, {})
        for i in range(3)
    ]
    model = run_round(WeightedAverage(), updates)
    total = sum(u.n_samples for u in updates)
    want = sum(u.n_samples * u.weights["big"].astype(np.float64) for u in updates) / total
    np.testing.assert_array_equal(model["big"], want.astype(np.float32))


def test_weighted_average_writes_into_next_model_when_offered():
    rng = np.random.default_rng(9)
    updates = random_updates(rng, 3)
    rule = WeightedAverage()
    rule.start_round(1, None)
    for update in updates:
        rule.add_update(update)
    # What the aggregator does around finish_round.
    rule.next_model = {k: np.empty(s, np.float32) for k, s in SHAPES.items()}
    model = rule.finish_round()
    assert all(model[k] is rule.next_model[k] for k in SHAPES)
    total = sum(u.n_samples for u in updates)
    want = {
        k: sum(u.n_samples * u.weights[k].astype(np.float64) for u in updates) / total
        for k in SHAPES
    }
    assert_close(model, want)


def test_weighted_average_keeps_16_bit_dtypes_and_refuses_an_empty_round():
    rng = np.random.default_rng(2)
    model = run_round(WeightedAverage(), random_updates(rng, 3, np.float16))
    assert all(a.dtype == np.float16 for a in model.values())
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = run_round(WeightedAverage(), random_updates(rng, 3, ml_dtypes.bfloat16))
    assert all(a.dtype == ml_dtypes.bfloat16 for a in model.values())
    with pytest.raises(ValueError, match="no update with a positive sample count"):
        run_round(WeightedAverage(), [])


def test_median_and_trimmed_mean_per_coordinate():
    rng = np.random.default_rng(3)
    for n in (1, 4, 7):
        updates = random_updates(rng, n)
        columns = {k: np.stack([u.weights[k].astype(np.float64) for u in updates]) for k in SHAPES}
        want = {}
        for k, stack in columns.items():
            flat = stack.reshape(n, -1)
            want[k] = np.array(
                [
                    sorted(flat[:, j])[n // 2]
                    if n % 2
                    else (sorted(flat[:, j])[n // 2 - 1] + sorted(flat[:, j])[n // 2]) / 2
                    for j in range(flat.shape[1])
                ]  # fmt: skip
            ).reshape(stack.shape[1:])
        assert_close(run_round(Median(), updates), want)

        for beta in (0.0, 0.15, 0.3):
            k_drop = int(np.floor(beta * n))
            want = {}
            for k, stack in columns.items():
                flat = stack.reshape(n, -1)
                kept = [sorted(flat[:, j])[k_drop : n - k_drop] for j in range(flat.shape[1])]
                want[k] = np.array([sum(c) / len(c) for c in kept]).reshape(stack.shape[1:])
            assert_close(run_round(TrimmedMean(beta=beta), updates), want)


def test_robust_rules_resist_two_scaled_updates_of_ten():
    rng = np.random.default_rng(4)
    honest = np.full(SHAPES["dense/bias"], 1.0)
    updates = []
    for i in range(10):
        value = honest * (1e6 if i < 2 else 1.0) + rng.normal(scale=1e-3, size=honest.shape)
        updates.append(Update(f"p{i}", read_only({"b": value.astype(np.float32)}), 10, {}))
    for rule in (Median(), TrimmedMean(beta=0.2), Krum(f=2)):
        model = run_round(rule, updates)
        np.testing.assert_allclose(model["b"], honest, rtol=1e-2)
    assert np.all(run_round(WeightedAverage(), updates)["b"] > 1e5)


def test_krum_picks_the_update_closest_to_its_neighbours():
    rng = np.random.default_rng(5)
    updates = random_updates(rng, 6)
    f = 1
    vectors = [np.concatenate([u.weights[k].astype(np.float64).ravel() for k in sorted(SHAPES)])
               for u in updates]  # fmt: skip
    scores = []
    for i, x in enumerate(vectors):
        d = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(vectors) if j != i)
        scores.append(sum(d[: len(updates) - f - 2]))
    best = updates[int(np.argmin(scores))]
    model = run_round(Krum(f=f), updates)
    for k in SHAPES:
        np.testing.assert_array_equal(model[k], best.weights[k])
        assert model[k].flags.writeable, "a copy, not the update's read-only view"


def test_krum_refuses_a_round_of_2f_plus_2_updates_and_bad_options():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match=r"needs more than 2f \+ 2 = 4 updates, the round has 4"):
        run_round(Krum(f=1), random_updates(rng, 4))
    with pytest.raises(ValueError, match="option f"):
        Krum(f=1.5)
    with pytest.raises(ValueError, match="option beta"):
        TrimmedMean(beta=0.5)


def test_fedadam_follows_reddi_et_al():
    rng = np.random.default_rng(7)
    eta, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-2
    rule = FedAdam(eta=eta, beta1=beta1, beta2=beta2, tau=tau)
    x = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, tau**2) for k, s in SHAPES.items()}
    for round in (1, 2, 3):
        updates = random_updates(rng, 5)
        total = sum(u.n_samples for u in updates)
        want = {}
        for k in SHAPES:
            avg = sum(u.n_samples * u.weights[k].astype(np.float64) for u in updates) / total
            delta = avg - x[k].astype(np.float64)
            m[k] = beta1 * m[k] + (1 - beta1) * delta
            v[k] = beta2 * v[k] + (1 - beta2) * delta**2
            want[k] = x[k].astype(np.float64) + eta * m[k] / (np.sqrt(v[k]) + tau)
        model = run_round(rule, updates, global_model=read_only(dict(x)), round=round)
        assert_close(model, want, rtol=1e-5)
        x = {k: np.array(a) for k, a in model.items()}


def test_fedadam_needs_the_global_model_and_checks_its_options():
    with pytest.raises(ValueError, match="global model"):
        FedAdam().start_round(1, None)
    for bad in ({"beta1": 1.0}, {"eta": 0.0}, {"tau": -1.0}):
        with pytest.raises(ValueError, match="option"):
            FedAdam(**bad)


def test_options_a_rule_does_not_know_are_refused():
    with pytest.raises(TypeError, match="takes no option: lr"):
        Aggregator(lr=0.1)
    with pytest.raises(TypeError):
        WeightedAverage(lr=0.1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Krum(m=3)  # type: ignore[call-arg]


def test_the_base_class_says_what_is_missing():
    rule = Aggregator()
    assert rule.holds_updates is True
    rule.start_round(1, None)
    with pytest.raises(NotImplementedError, match="add_update"):
        rule.add_update(Update("p", {}, 1, {}))
    with pytest.raises(NotImplementedError, match="finish_round"):
        rule.finish_round()
