"""The Keras regressor every participant trains, and the central baseline trains too.

Importing this module imports Keras (on the JAX backend, CPU only, unless the environment
already chose otherwise), which takes seconds: the data commands do not import it.
"""

from __future__ import annotations

import os

# Before Keras is imported: the backend is read once, at import. JAX on the CPU (no GPU probe,
# no warning about a missing one); the user's own choice, when set, wins.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


@dataclass(frozen=True)
class Hyperparameters:
    """The model and its local training; the same for every participant and the baseline."""

    hidden: tuple[int, ...] = (64, 32)
    l2: float = 1e-3
    learning_rate: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    """Seeds the initial weights (round 0's model, and the central baseline's start)."""


def build_model(spec: Mapping[str, Any], hp: Hyperparameters | None = None) -> keras.Model:
    """A small dense network from the preprocessing spec's features to log(SalePrice).

    Layers are named explicitly: the tensor names on the wire come from the layer names
    (``hidden_1/kernel``, ...), and Keras' automatic names (``dense``, ``dense_1``) depend
    on how many layers a process created before, so they would differ between processes.

    The last layer maps the network's standardized output back to log prices with the target
    mean and standard deviation of the spec (constants of the architecture, not weights), so
    the untrained model already predicts the mean price and its output is the log price.
    """
    hp = hp or Hyperparameters()
    keras.utils.set_random_seed(hp.seed)
    regularizer = keras.regularizers.L2(hp.l2) if hp.l2 else None
    inputs = keras.Input((int(spec["n_features"]),), name="features")
    x = inputs
    for i, units in enumerate(hp.hidden, start=1):
        x = keras.layers.Dense(
            units, activation="relu", kernel_regularizer=regularizer, name=f"hidden_{i}"
        )(x)
    x = keras.layers.Dense(1, name="standardized_log_price")(x)
    target = spec["target"]
    x = keras.layers.Rescaling(
        scale=float(target["std"]), offset=float(target["mean"]), name="log_price"
    )(x)
    model = keras.Model(inputs, x, name="house_prices")
    model.compile(
        optimizer=keras.optimizers.Adam(hp.learning_rate),
        loss="mse",
        metrics=[keras.metrics.RootMeanSquaredError(name="rmse")],
    )
    return model


class _EpochBar(keras.callbacks.Callback):
    """Advances a tqdm bar once per epoch, showing the latest loss."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        self.bar.update(1)


def fit(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    description: str = "training",
    progress: bool | None = None,
) -> float:
    """Train ``epochs`` epochs with a tqdm bar (``progress=None``: only on a terminal); the
    last epoch's training loss."""
    # tqdm's disable=None: shown only when stderr is a terminal.
    disable = None if progress is None else not progress
    with tqdm(total=epochs, desc=description, unit="epoch", leave=False, disable=disable) as bar:
        history = model.fit(
            x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[_EpochBar(bar)]
        )
    return float(history.history["loss"][-1])


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Keras' own evaluation: ``loss`` (MSE of log prices plus the L2 penalty) and ``rmse``
    (the root mean squared error of log prices, i.e. the RMSLE of prices)."""
    # One batch of the whole (small) set: JAX compiles the test step once per batch shape,
    # and a last, partial batch would be a second shape to compile.
    batch_size = max(1, min(len(x), 4096))
    result = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return {key: float(value) for key, value in result.items()}
