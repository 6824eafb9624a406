"""rondo.keras: a Keras model's weights <-> named tensors (skipped without Keras)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
keras = pytest.importorskip("keras")

import rondo.keras  # noqa: E402
from rondo.safetensors_io import decode, encode  # noqa: E402


def model(seed: int = 0, hidden: int = 4) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)  # has an integer seed state: left out
    outputs = keras.layers.Dense(1, name="out")(x)
    return keras.Model(inputs, outputs)


def test_names_come_from_layer_and_weight_paths() -> None:
    assert rondo.keras.tensor_names(model()) == [
        "hidden/kernel",
        "hidden/bias",
        "norm/gamma",
        "norm/beta",
        "norm/moving_mean",
        "norm/moving_variance",
        "out/kernel",
        "out/bias",
    ]


def test_round_trip_through_the_wire_format() -> None:
    source, target = model(seed=1), model(seed=2)
    weights = rondo.keras.get_weights(source)
    assert {k: v.shape for k, v in weights.items()}["hidden/kernel"] == (3, 4)
    decoded, _ = decode(encode(weights, {}))
    rondo.keras.set_weights(target, decoded)
    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(source.predict(x, verbose=0), target.predict(x, verbose=0))


def test_float64_weights_are_converted_to_the_variables_dtype() -> None:
    m = model()
    weights = {k: v.astype(np.float64) + 1 for k, v in rondo.keras.get_weights(m).items()}
    rondo.keras.set_weights(m, weights)
    kernel = rondo.keras.get_weights(m)["hidden/kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_allclose(kernel, weights["hidden/kernel"], rtol=1e-6)


def test_mismatches_are_refused_and_nothing_is_assigned() -> None:
    m = model()
    before = rondo.keras.get_weights(m)
    wrong = {k: np.array(v) + 1 for k, v in before.items()}
    wrong["out/bias"] = np.zeros(2, np.float32)
    del wrong["norm/gamma"]
    wrong["extra/kernel"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as info:
        rondo.keras.set_weights(m, wrong)
    message = str(info.value)
    assert "norm/gamma" in message and "extra/kernel" in message and "out/bias" in message
    after = rondo.keras.get_weights(m)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_extra_tensors_may_be_allowed() -> None:
    m = model()
    weights = {**rondo.keras.get_weights(m), "optimizer/step": np.zeros(1, np.float32)}
    rondo.keras.set_weights(m, weights, strict=False)


def test_duplicate_paths_are_refused() -> None:
    # Keras itself refuses duplicate layer names in one model; nested models built from
    # separate code can still collide. A stand-in with two variables of one path:
    class Variable:
        def __init__(self) -> None:
            self.path, self.dtype, self.shape = "same/kernel", "float32", (1,)

    class Model:
        weights = [Variable(), Variable()]

    with pytest.raises(ValueError, match="same/kernel"):
        rondo.keras.get_weights(Model())


def test_not_a_model() -> None:
    with pytest.raises(TypeError):
        rondo.keras.get_weights(object())


def test_importing_rondo_does_not_import_the_helpers() -> None:
    code = (
        "import sys, rondo; "
        "bad = [m for m in ('keras', 'sklearn', 'rondo.keras', 'rondo.sklearn', 'rondo.models')"
        " if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
