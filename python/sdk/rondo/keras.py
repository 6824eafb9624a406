"""Keras models as :data:`rondo.Weights`: named tensors, both directions.

Imports Keras, so it is imported only when used (``import rondo.keras``); ``import rondo``
alone does not load it. Works with Keras 3 on any backend (and with ``tf.keras`` models, whose
variables have ``name`` rather than ``path``)::

    import rondo.keras

    class KerasParticipant(rondo.Participant):
        def initial_weights(self):
            return rondo.keras.get_weights(self.model)

        def train_round(self, weights, round):
            rondo.keras.set_weights(self.model, weights)
            history = self.model.fit(self.x, self.y, epochs=1, verbose=0)
            return rondo.keras.get_weights(self.model), len(self.x), {
                "loss": history.history["loss"][-1]}

**Names.** A tensor is named by its variable's path, e.g. ``hidden_1/kernel`` (layer name,
then weight name), so an update matches the global model by name, not by position in
``model.get_weights()``. The names are stable across processes only if the layer names are:
Keras numbers automatic names per process (``dense``, ``dense_1``, ... in creation order), so
give every layer with weights a ``name=`` (or build the model the same way, first thing, in
every process). :func:`tensor_names` shows what a model would send.

Every floating-point variable in ``model.weights`` is carried: trainable ones and the
non-trainable ones the model computes with (e.g. batch-normalization moving statistics, which
FedAvg then averages too). Variables of other dtypes (integer counters, random-seed states) are
not model weights to average, and Rondo carries floating-point tensors only: they are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .types import Weights

__all__ = ["get_weights", "set_weights", "tensor_names"]


def _name(variable: Any) -> str:
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    # tf.keras (Keras 2): "dense/kernel:0"
    return str(variable.name).removesuffix(":0")


def _is_float(variable: Any) -> bool:
    try:
        return np.issubdtype(np.dtype(str(variable.dtype)), np.floating)
    except TypeError:
        # A dtype numpy does not know by name (e.g. bfloat16 without ml_dtypes): its name says.
        return "float" in str(variable.dtype)


def _variables(model: Any) -> list[tuple[str, Any]]:
    try:
        variables: Sequence[Any] = model.weights
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a Keras model (no .weights)") from None
    named = [(_name(v), v) for v in variables if _is_float(v)]
    seen: dict[str, int] = {}
    for name, _ in named:
        seen[name] = seen.get(name, 0) + 1
    if duplicates := sorted(name for name, count in seen.items() if count > 1):
        raise ValueError(
            f"the model has several variables named {', '.join(map(repr, duplicates))}; give "
            "its layers distinct names so that each tensor has its own"
        )
    if not named:
        raise ValueError(
            "the model has no floating-point weights: build it first (call it on an input, "
            "or give it an Input)"
        )
    return named


def tensor_names(model: Any) -> list[str]:
    """The names :func:`get_weights` gives ``model``'s tensors, in the model's order."""
    return [name for name, _ in _variables(model)]


def get_weights(model: Any) -> Weights:
    """``model``'s floating-point weights as named numpy arrays.

    The arrays are snapshots of the values now; with some backends (JAX) they are read-only
    views of the backend's buffers, which is all an upload needs. Copy one before changing it.

    Raises:
        TypeError: ``model`` is not a Keras model.
        ValueError: the model is not built, or two of its variables have the same path.
    """
    return {name: _value(variable) for name, variable in _variables(model)}


def _value(variable: Any) -> np.ndarray:
    # Keras 3: `.value` is the backend's array (a JAX array converts without a copy);
    # `.numpy()` would go through a deprecated numpy conversion path. tf.keras: a method.
    value = getattr(variable, "value", None)
    if value is None or callable(value):
        return np.asarray(variable.numpy())
    return np.asarray(value)


def set_weights(model: Any, weights: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
    """Assign ``weights`` (e.g. the global model) to ``model``'s variables, by name.

    Each array must have its variable's shape; its dtype is converted to the variable's when
    they differ (e.g. a float64 model for float32 variables). Nothing is assigned unless every
    tensor fits.

    Args:
        model: a built Keras model.
        weights: tensor name -> array, as :func:`get_weights` names them.
        strict: refuse ``weights`` with tensors the model does not have (the default: a name
            that matches nothing is usually a model built differently). Missing tensors are
            always refused.

    Raises:
        ValueError: a tensor is missing, unexpected (with ``strict``), or of the wrong shape;
            the message names them.
    """
    variables = _variables(model)
    names = {name for name, _ in variables}
    problems = []
    if missing := sorted(names - set(weights)):
        problems.append(f"missing tensors {missing}")
    if strict and (unexpected := sorted(set(weights) - names)):
        problems.append(f"tensors the model does not have {unexpected}")
    updates = []
    for name, variable in variables:
        if name not in weights:
            continue
        array = np.asarray(weights[name])
        shape = tuple(int(d) for d in variable.shape)
        if array.shape != shape:
            problems.append(f"{name!r} has shape {array.shape}, the model's is {shape}")
            continue
        updates.append((variable, array))
    if problems:
        raise ValueError("weights do not fit the model: " + "; ".join(problems))
    for variable, array in updates:
        dtype = str(variable.dtype)
        variable.assign(array if str(array.dtype) == dtype else array.astype(dtype))
