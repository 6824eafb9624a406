"""scikit-learn linear models as :data:`rondo.Weights`, both directions.

For estimators whose learned state is ``coef_`` and ``intercept_``: ``SGDClassifier``,
``SGDRegressor``, ``LogisticRegression``, ``LinearRegression``, ``Ridge``, ``Perceptron``, ...
The two become the tensors ``coef`` and ``intercept`` (float64, as scikit-learn keeps them;
Rondo averages F64 models in f64). Imported only when used (``import rondo.sklearn``); it does
not import scikit-learn itself, it only reads and sets the two attributes::

    import rondo.sklearn

    class SGDParticipant(rondo.Participant):
        def initial_weights(self):
            return rondo.sklearn.zero_weights(n_features=64, n_classes=10)

        def train_round(self, weights, round):
            rondo.sklearn.set_weights(self.model, weights, classes=CLASSES)
            self.model.partial_fit(self.x, self.y, classes=CLASSES)
            return rondo.sklearn.get_weights(self.model), len(self.x), {}

A model that was never fitted has no ``coef_``: :func:`set_weights` gives it one (and
``classes_``, for a classifier's ``partial_fit`` to accept it as started). Iterative
estimators then continue from the global weights: ``partial_fit`` does; ``fit`` does with
``warm_start=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .types import Weights

__all__ = ["COEF", "INTERCEPT", "get_weights", "set_weights", "zero_weights"]

COEF = "coef"
INTERCEPT = "intercept"


def get_weights(model: Any, *, prefix: str = "") -> Weights:
    """``model.coef_`` and ``model.intercept_`` as ``{prefix + "coef", prefix + "intercept"}``.

    Copies, in float64 (or the model's own float dtype), C-contiguous: the model may change its
    arrays in place afterwards (``partial_fit`` does) without changing what is uploaded. A
    scalar intercept (``fit_intercept=False`` keeps ``0.0``) becomes a 0-d tensor.

    Raises:
        ValueError: the model has no ``coef_`` yet (never fitted nor set).
    """
    coef = getattr(model, "coef_", None)
    if coef is None:
        raise ValueError(
            f"{type(model).__name__} has no coef_ yet: fit it, or set_weights it, first"
        )
    intercept = getattr(model, "intercept_", 0.0)
    return {prefix + COEF: _float_copy(coef), prefix + INTERCEPT: _float_copy(intercept)}


def set_weights(
    model: Any,
    weights: Mapping[str, np.ndarray],
    *,
    classes: Sequence[Any] | np.ndarray | None = None,
    prefix: str = "",
) -> None:
    """Give ``model`` the ``coef`` and ``intercept`` of ``weights`` (copies the model owns).

    When the model already has a ``coef_``, the new one must have its shape (the same features
    and classes). ``classes`` sets ``classes_``, which a classifier that has never been fitted
    needs before it predicts or continues with ``partial_fit``; for a multi-class model it must
    have one class per row of ``coef``.

    Raises:
        ValueError: a tensor is missing, or its shape does not fit the model or ``classes``.
    """
    names = (prefix + COEF, prefix + INTERCEPT)
    if missing := [name for name in names if name not in weights]:
        raise ValueError(f"weights lack {missing}; they have {sorted(weights)}")
    coef = _float_copy(weights[names[0]])
    intercept = _float_copy(weights[names[1]])
    old = getattr(model, "coef_", None)
    if old is not None and np.shape(old) != coef.shape:
        raise ValueError(f"coef has shape {coef.shape}, the model's coef_ is {np.shape(old)}")
    if coef.ndim == 2 and intercept.shape not in ((coef.shape[0],), ()):
        raise ValueError(f"intercept has shape {intercept.shape}, coef {coef.shape}")
    if classes is not None:
        classes = np.asarray(classes)
        rows = coef.shape[0] if coef.ndim == 2 else 1
        # Binary classifiers keep one row of coefficients for two classes.
        if not (len(classes) == rows or (rows == 1 and len(classes) == 2)):
            raise ValueError(f"{len(classes)} classes do not fit coef of shape {coef.shape}")
        model.classes_ = classes
    model.coef_ = coef
    model.intercept_ = intercept


def zero_weights(
    n_features: int,
    n_classes: int | None = None,
    *,
    dtype: np.dtype | type = np.float64,
    prefix: str = "",
) -> Weights:
    """All-zero initial weights in scikit-learn's layout: ``coef`` of shape
    ``(n_classes, n_features)`` (``(1, n_features)`` for two classes; ``(n_features,)`` for a
    regressor, ``n_classes=None``) and the matching ``intercept``."""
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    if n_classes is None:
        return {
            prefix + COEF: np.zeros(n_features, dtype),
            prefix + INTERCEPT: np.zeros(1, dtype),
        }
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    rows = 1 if n_classes == 2 else n_classes
    return {
        prefix + COEF: np.zeros((rows, n_features), dtype),
        prefix + INTERCEPT: np.zeros(rows, dtype),
    }


def _float_copy(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    # np.array(copy=True, order="C") keeps 0-d arrays 0-d (np.ascontiguousarray would not).
    return np.array(array, order="C", copy=True)
