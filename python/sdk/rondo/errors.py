"""Exceptions raised by the Rondo SDK."""

from __future__ import annotations


class RondoError(Exception):
    """Base class of every error the SDK raises on its own."""


class CoordinatorUnavailable(RondoError):
    """The coordinator could not be reached within the connect timeout."""


class NetworkError(RondoError):
    """A Rondo service could not be reached, or an exchange with it broke off (connection
    refused or reset, timeout, a body that ended early)."""


class ApiError(RondoError):
    """A Rondo service answered with an error (any 4xx/5xx).

    Attributes:
        status: the HTTP status code.
        code: the stable, machine-readable error code (e.g. ``"token_expired"``); when the body
            is not the documented ``{"error": {...}}`` shape, ``"http_<status>"``.
        message: the human-readable message from the service.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ModelNotAvailable(RondoError):
    """The aggregator has no global model (round 0 has not closed), or not the round asked for
    (its model store does not keep it, or it has no store).

    Attributes:
        requested: the round asked for (None: the latest).
        available: the round of the model the aggregator holds, when that is known (None: it
            holds none, or the answer did not say).
    """

    def __init__(self, message: str, requested: int | None, available: int | None) -> None:
        super().__init__(message)
        self.requested = requested
        self.available = available


class ChecksumMismatch(RondoError):
    """A downloaded model is not the file its manifest describes (its SHA-256 or length
    differ): it was not written where it was asked to be.

    Attributes:
        expected: the manifest's SHA-256 (hex).
        actual: the SHA-256 of what came (hex).
    """

    def __init__(self, message: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DTypeUnavailable(RondoError):
    """A tensor has a dtype that this Python installation cannot represent.

    Today that is BF16 without the ``ml_dtypes`` package (numpy has no bfloat16 of its own):
    ``pip install ml_dtypes``, or ``pip install rondo[bf16]``. Raised when such a model is
    decoded, so before any training on it.

    Attributes:
        tensor: the name of the (first) tensor concerned.
        dtype: its safetensors dtype, e.g. ``"BF16"``.
    """

    def __init__(self, tensor: str, dtype: str, message: str) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.dtype = dtype
