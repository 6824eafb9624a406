"""Rondo: the Python SDK for federated-learning participants.

Implement a :class:`Participant` (two methods over dicts of numpy arrays) and hand it to
:func:`run_participant`, which joins the coordinator, heartbeats, downloads the global model,
calls your training code and uploads the result, round after round::

    report = rondo.run_participant(MyParticipant(), "http://127.0.0.1:8081")

Modules: :mod:`rondo.participant` (the interface and the report), :mod:`rondo.runner` (the
protocol: joining, heartbeats, rounds), :mod:`rondo.transport` (HTTP on :mod:`http.client`:
downloads read in place, uploads sent from the arrays, TLS options, proxies; the
:class:`Transport` protocol a caller may implement instead), :mod:`rondo.safetensors_io` (the
wire encoding of weights: float32, float64, float16, and bfloat16 with ``ml_dtypes``),
:mod:`rondo.errors`, :mod:`rondo.util`, :mod:`rondo.model_store` (the aggregator's kept models:
:func:`download_model` saves one to a file, checked against its manifest's SHA-256).

Helpers, imported only when used (``import rondo.keras``; ``import rondo`` loads none of them):
:mod:`rondo.keras` (a Keras model's weights <-> named tensors), :mod:`rondo.sklearn`
(scikit-learn linear models' ``coef_``/``intercept_`` <-> named tensors), :mod:`rondo.models`
(download the federation's global model from the aggregator).
"""

from .errors import (
    ApiError,
    ChecksumMismatch,
    CoordinatorUnavailable,
    DTypeUnavailable,
    ModelNotAvailable,
    NetworkError,
    RondoError,
)
from .model_store import download_model
from .participant import Participant, ParticipantReport
from .runner import run_participant
from .transport import HttpClient, Transport
from .types import Weights

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "ChecksumMismatch",
    "CoordinatorUnavailable",
    "DTypeUnavailable",
    "HttpClient",
    "ModelNotAvailable",
    "NetworkError",
    "Participant",
    "ParticipantReport",
    "RondoError",
    "Transport",
    "Weights",
    "__version__",
    "download_model",
    "run_participant",
]
