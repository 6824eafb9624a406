"""Safetensors encoding and decoding of :data:`rondo.Weights`.

Uploads are streamed: :func:`encode_stream` yields the header and then views of the arrays'
own memory, so that sending a model never holds a second full copy of it. Decoding uses the
``safetensors`` package.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping

import numpy as np
import safetensors.numpy

from .types import Weights

DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("float16"): "F16",
}
"""numpy dtypes the SDK can send, and their safetensors names."""

# urllib3 copies each chunk of a chunked body once (to frame it), so chunks are kept small
# rather than one memoryview per possibly-gigabyte tensor.
DEFAULT_CHUNK_BYTES = 1 << 20


def _prepare(weights: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Check names and dtypes; return (name, C-contiguous little-endian array) sorted by name."""
    prepared = []
    for name in sorted(weights):
        array = np.asarray(weights[name])
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if array.dtype.newbyteorder("=") not in DTYPE_NAMES:
            supported = ", ".join(str(d) for d in DTYPE_NAMES)
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}; supported: {supported}")
        # No copy unless the array is big-endian or not C-contiguous (and, unlike
        # np.ascontiguousarray, 0-d arrays stay 0-d).
        little = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        prepared.append((name, little))
    return prepared


def encode_stream(
    weights: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes | memoryview]:
    """Yield ``weights`` as a safetensors file, piece by piece.

    The first piece is the header: the 8-byte little-endian length, then the JSON header padded
    with spaces to a multiple of 8, with ``__metadata__`` (when ``metadata`` is not empty) and
    the tensors sorted by name. Then come the tensors' bytes, in the same order, as memoryviews
    of the arrays themselves, at most ``chunk_bytes`` long: arrays that are already C-contiguous
    and little-endian are not copied. Do not modify the arrays while the stream is consumed.

    Suitable as a ``requests`` body (sent with chunked transfer encoding).

    Raises:
        TypeError: a tensor has an unsupported dtype (raised before anything is yielded).
        ValueError: a tensor is named ``__metadata__``.
    """
    prepared = _prepare(weights)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, array in prepared:
        header[name] = {
            "dtype": DTYPE_NAMES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return _stream(struct.pack("<Q", len(text)) + text, prepared, chunk_bytes)


def _stream(
    header: bytes, prepared: list[tuple[str, np.ndarray]], chunk_bytes: int
) -> Iterator[bytes | memoryview]:
    # A separate generator so that encode_stream validates eagerly, at call time.
    yield header
    for _, array in prepared:
        view = array.reshape(-1).view(np.uint8).data  # a memoryview, no copy
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


def encode(weights: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Return ``weights`` as one safetensors ``bytes`` object (a full copy; for small models)."""
    return b"".join(encode_stream(weights, metadata))


def decode(data: bytes) -> tuple[Weights, dict[str, str]]:
    """Decode a safetensors file into ``(weights, metadata)``.

    The arrays are read-only (they are views of buffers owned by the ``safetensors`` package);
    copy one before modifying it in place.

    Raises:
        ValueError: ``data`` is not a valid safetensors file.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", data)
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
        weights = safetensors.numpy.load(bytes(data) if not isinstance(data, bytes) else data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"not a valid safetensors file: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    return weights, {str(k): str(v) for k, v in metadata.items()}
