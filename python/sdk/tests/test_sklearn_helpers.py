"""rondo.sklearn: linear models' coef_/intercept_ <-> named tensors (skipped without sklearn)."""

from __future__ import annotations

import numpy as np
import pytest

linear_model = pytest.importorskip("sklearn.linear_model")

import rondo.sklearn  # noqa: E402
from rondo.safetensors_io import decode, encode  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 5))
Y3 = RNG.integers(0, 3, size=60)
CLASSES = np.arange(3)


def test_zero_weights_have_scikit_learns_layout() -> None:
    assert {k: v.shape for k, v in rondo.sklearn.zero_weights(5, 3).items()} == {
        "coef": (3, 5),
        "intercept": (3,),
    }
    assert rondo.sklearn.zero_weights(5, 2)["coef"].shape == (1, 5)
    assert rondo.sklearn.zero_weights(5)["coef"].shape == (5,)
    with pytest.raises(ValueError):
        rondo.sklearn.zero_weights(0, 3)
    with pytest.raises(ValueError):
        rondo.sklearn.zero_weights(5, 1)


def test_an_unfitted_classifier_continues_from_set_weights_with_partial_fit() -> None:
    model = linear_model.SGDClassifier(loss="log_loss", random_state=0)
    start = {k: v + 0.5 for k, v in rondo.sklearn.zero_weights(5, 3).items()}
    rondo.sklearn.set_weights(model, start, classes=CLASSES)
    np.testing.assert_array_equal(model.predict(X[:3]).shape, (3,))  # usable at once
    model.partial_fit(X, Y3, classes=CLASSES)
    weights = rondo.sklearn.get_weights(model)
    assert weights["coef"].shape == (3, 5) and weights["coef"].dtype == np.float64
    assert not np.allclose(weights["coef"], 0.5)  # trained from the start it was given
    # Copies: training on does not change what was taken.
    taken = weights["coef"].copy()
    model.partial_fit(X, Y3)
    np.testing.assert_array_equal(weights["coef"], taken)


def test_round_trip_through_the_wire_format_predicts_the_same() -> None:
    fitted = linear_model.LogisticRegression(max_iter=200).fit(X, Y3)
    decoded, _ = decode(encode(rondo.sklearn.get_weights(fitted), {}))
    fresh = linear_model.LogisticRegression()
    rondo.sklearn.set_weights(fresh, decoded, classes=fitted.classes_)
    np.testing.assert_array_equal(fresh.predict(X), fitted.predict(X))
    # The model owns its arrays (not views of the download buffer).
    assert not np.shares_memory(fresh.coef_, decoded["coef"])


def test_regressor_and_scalar_intercept() -> None:
    y = X @ np.arange(5.0)
    fitted = linear_model.LinearRegression(fit_intercept=False).fit(X, y)
    weights = rondo.sklearn.get_weights(fitted, prefix="lin/")
    assert weights["lin/coef"].shape == (5,) and weights["lin/intercept"].shape == ()
    decoded, _ = decode(encode(weights, {}))
    fresh = linear_model.LinearRegression(fit_intercept=False)
    rondo.sklearn.set_weights(fresh, decoded, prefix="lin/")
    np.testing.assert_allclose(fresh.predict(X), y, atol=1e-9)


def test_mismatches_are_refused() -> None:
    fitted = linear_model.LogisticRegression(max_iter=200).fit(X, Y3)
    with pytest.raises(ValueError, match="lack"):
        rondo.sklearn.set_weights(fitted, {"coef": np.zeros((3, 5))})
    with pytest.raises(ValueError, match="shape"):
        rondo.sklearn.set_weights(fitted, rondo.sklearn.zero_weights(4, 3))
    with pytest.raises(ValueError, match="classes"):
        rondo.sklearn.set_weights(
            linear_model.SGDClassifier(), rondo.sklearn.zero_weights(5, 3), classes=[0, 1]
        )
    with pytest.raises(ValueError, match="no coef_"):
        rondo.sklearn.get_weights(linear_model.SGDClassifier())
