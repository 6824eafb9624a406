"""The federation's global model, downloaded from the aggregator.

:func:`download_model` fetches the latest global model (``GET /v1/model``, no credentials) as
:data:`rondo.Weights`; :func:`fetch_model` also returns the round that produced it and the
file's metadata. With the Keras or scikit-learn helpers it goes straight back into a model::

    import rondo.keras, rondo.models

    weights = rondo.models.download_model("http://127.0.0.1:8091")
    rondo.keras.set_weights(model, weights)

**Which rounds exist.** Here, the aggregator's one global model in memory, the latest:
``round=r`` gets it only while it is round ``r``'s (else :class:`ModelNotAvailable` says which
round it holds). An aggregator with a model store (``store.data_dir``) also keeps past rounds'
models: :func:`rondo.download_model` saves any kept round to a file, checked against its
manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ApiError, ModelNotAvailable, NetworkError
from .safetensors_io import decode
from .transport import HttpClient, Transport
from .types import Weights

__all__ = ["GlobalModel", "ModelNotAvailable", "download_model", "fetch_model"]

DOWNLOAD_TIMEOUT = 600.0
"""Seconds without progress after which a download is given up (as the runner's)."""


@dataclass
class GlobalModel:
    """A downloaded global model."""

    weights: Weights
    """Tensor name -> array (writable views of one download buffer)."""
    round: int | None
    """The round whose aggregation produced it (0: the initial model); None if the file did
    not say (``rondo.round`` metadata missing)."""
    metadata: dict[str, str]
    """The safetensors file's ``__metadata__``."""


def fetch_model(
    aggregator_url: str,
    round: int | None = None,
    *,
    transport: Transport | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> GlobalModel:
    """Download the aggregator's global model with its round and metadata.

    Args:
        aggregator_url: the aggregator's base URL, e.g. ``http://127.0.0.1:8091`` (the
            coordinator's ``GET /v1/status`` names it as ``aggregator_url``).
        round: the round whose model is wanted; None for the latest. The aggregator keeps only
            its latest model, so a given round is available only while it is the latest.
        transport: what to speak HTTP with; default a new :class:`~rondo.transport.HttpClient`
            (closed afterwards). ``https`` options (CA file, client certificate) are set on
            the transport.
        timeout: seconds without progress after which the download is given up.

    Raises:
        ModelNotAvailable: no model yet (404 ``no_model``), or the model held is of another
            round than ``round``.
        ApiError: any other error answer.
        NetworkError: the aggregator could not be reached, the download broke off, or what
            came is not a valid safetensors file.
    """
    if round is not None and (isinstance(round, bool) or round < 0):
        raise ValueError(f"round must be a non-negative integer or None, got {round!r}")
    url = f"{aggregator_url.rstrip('/')}/v1/model"
    client = transport if transport is not None else HttpClient()
    try:
        try:
            data = client.download(url, timeout=timeout)
        except ApiError as exc:
            if exc.code == "no_model":
                raise ModelNotAvailable(
                    f"the aggregator at {aggregator_url} has no global model yet (round 0 "
                    "has not closed)",
                    round,
                    None,
                ) from exc
            raise
    finally:
        if transport is None:
            client.close()
    try:
        weights, metadata = decode(data)
    except ValueError as exc:
        raise NetworkError(f"download of {url} is not a valid model: {exc}") from exc
    text = metadata.get("rondo.round")
    produced = int(text) if text is not None and text.isdigit() else None
    if round is not None and produced != round:
        raise ModelNotAvailable(
            f"the aggregator at {aggregator_url} holds the model of round {produced}, not "
            f"round {round}: it keeps only its latest global model",
            round,
            produced,
        )
    return GlobalModel(weights, produced, metadata)


def download_model(
    aggregator_url: str,
    round: int | None = None,
    *,
    transport: Transport | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Weights:
    """The aggregator's global model (the latest, or ``round``'s) as named numpy arrays.

    :func:`fetch_model` without the metadata; the same arguments and errors.
    """
    return fetch_model(aggregator_url, round, transport=transport, timeout=timeout).weights
