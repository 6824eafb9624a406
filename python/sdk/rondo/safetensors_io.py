"""Safetensors encoding and decoding of :data:`rondo.Weights`.

Uploads are streamed: :func:`encode_stream` yields the header and then views of the arrays'
own memory, so that sending a model never holds a second full copy of it. :func:`decode` is
zero-copy the other way: its arrays are views of the downloaded buffer.

Dtypes: F32, F64 and F16 are numpy's own; BF16 is ``ml_dtypes.bfloat16`` (the package Keras
and JAX use), imported only when a BF16 tensor is met, so that it costs nothing otherwise.
Without it, a BF16 tensor is refused (:class:`~rondo.errors.DTypeUnavailable`) rather than
widened: an update must have the global model's dtypes, so a widened model could not be sent
back.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterator, Mapping

import numpy as np

from .errors import DTypeUnavailable
from .types import Weights

DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("float16"): "F16",
}
"""numpy's own dtypes the SDK can send, and their safetensors names; and ``bfloat16`` of
``ml_dtypes`` (not listed: this module does not import that package unless it has to)."""

SUPPORTED_DTYPES = "float32, float64, float16, bfloat16 (ml_dtypes)"

BF16_HINT = "pip install ml_dtypes (or pip install rondo[bf16])"


def _is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (told without importing ml_dtypes: an array
    of it exists only once the package is imported)."""
    return dtype.name == "bfloat16" and dtype.type.__module__.split(".")[0] == "ml_dtypes"


def bfloat16_dtype(tensor: str = "?") -> np.dtype:
    """``ml_dtypes.bfloat16`` as a numpy dtype, importing the package on first use.

    Raises:
        DTypeUnavailable: ``ml_dtypes`` is not installed; the message names ``tensor``.
    """
    try:
        import ml_dtypes
    except ImportError as exc:
        raise DTypeUnavailable(
            tensor,
            "BF16",
            f"tensor {tensor!r} is BF16 (bfloat16), which numpy represents only with the "
            f"ml_dtypes package, and it is not installed: {BF16_HINT}",
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def _wire_name(dtype: np.dtype) -> str | None:
    """The safetensors name of a dtype the SDK can send (in any byte order), or None."""
    if _is_bfloat16(dtype):
        return "BF16"
    return DTYPE_NAMES.get(dtype.newbyteorder("="))


# Each piece is handed to the socket as it is (no copy); pieces of a bounded size keep any one
# call short for a possibly-gigabyte tensor, and at this size cost nothing measurable.
DEFAULT_CHUNK_BYTES = 1 << 24


def _prepare(weights: Mapping[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """Check names and dtypes; return (name, safetensors dtype, C-contiguous little-endian
    array) sorted by name."""
    prepared = []
    for name in sorted(weights):
        array = np.asarray(weights[name])
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        wire = _wire_name(array.dtype)
        if wire is None:
            raise TypeError(
                f"tensor {name!r} has dtype {array.dtype}; supported: {SUPPORTED_DTYPES}"
            )
        # No copy unless the array is big-endian or not C-contiguous (and, unlike
        # np.ascontiguousarray, 0-d arrays stay 0-d).
        if wire == "BF16":  # ml_dtypes' dtype has the machine's byte order only
            little = np.asarray(array, order="C")
            if sys.byteorder == "big":
                little = little.view(np.uint16).byteswap().view(array.dtype)
        else:
            little = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        prepared.append((name, wire, little))
    return prepared


def encode_stream(
    weights: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SafetensorsStream:
    """``weights`` as a safetensors file, to be iterated piece by piece.

    The first piece is the header: the 8-byte little-endian length, then the JSON header padded
    with spaces to a multiple of 8, with ``__metadata__`` (when ``metadata`` is not empty) and
    the tensors sorted by name. Then come the tensors' bytes, in the same order, as memoryviews
    of the arrays themselves, at most ``chunk_bytes`` long: arrays that are already C-contiguous
    and little-endian are not copied. Do not modify the arrays while the stream is consumed.

    The result knows its total length (``len()``), so it is sent with a ``Content-Length``
    and each piece goes to the socket as it is (see :meth:`rondo.transport.HttpClient.upload`).

    Supported dtypes: float32, float64, float16 and ``ml_dtypes.bfloat16`` (sent as BF16).

    Raises:
        TypeError: a tensor has an unsupported dtype (raised before anything is yielded).
        ValueError: a tensor is named ``__metadata__``.
    """
    prepared = _prepare(weights)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, wire, array in prepared:
        header[name] = {
            "dtype": wire,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return SafetensorsStream(struct.pack("<Q", len(text)) + text, prepared, chunk_bytes)


class SafetensorsStream:
    """A safetensors file that is never assembled: its header, then views of the arrays.

    Iterating yields the pieces (each iteration starts over); ``len()`` is the file's size.
    """

    def __init__(
        self, header: bytes, prepared: list[tuple[str, str, np.ndarray]], chunk_bytes: int
    ) -> None:
        self._header = header
        self._prepared = prepared
        self._chunk_bytes = chunk_bytes

    def __len__(self) -> int:
        return len(self._header) + sum(array.nbytes for _, _, array in self._prepared)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield self._header
        for _, _, array in self._prepared:
            view = array.reshape(-1).view(np.uint8).data  # a memoryview, no copy
            for start in range(0, len(view), self._chunk_bytes):
                yield view[start : start + self._chunk_bytes]


def encode(weights: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Return ``weights`` as one safetensors ``bytes`` object (a full copy; for small models)."""
    return b"".join(encode_stream(weights, metadata))


def decode(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[Weights, dict[str, str]]:
    """Decode a safetensors file into ``(weights, metadata)``, without copying the tensors.

    The arrays are views of ``data``'s own memory (no copy): they are writable when ``data``
    is writable (a ``bytearray``, or the array :meth:`rondo.transport.HttpClient.download`
    returns), read-only when it is ``bytes``. They keep ``data`` alive; modifying one in place
    modifies ``data``.

    The file is checked strictly: a JSON header object of tensors with ``dtype`` F32, F64, F16
    or BF16, ``shape`` a list of non-negative ints and ``data_offsets`` that cover the data
    section exactly (contiguous from 0 in offset order, ``end - begin`` equal to the tensor's
    size, no trailing bytes), and an optional ``__metadata__`` of strings.

    Every tensor keeps its dtype: F32, F64 and F16 as numpy's ``float32``, ``float64`` and
    ``float16``, BF16 as ``ml_dtypes.bfloat16`` (imported here, only when a BF16 tensor is
    met), so that a model trained on these arrays is sent back in the dtypes it came in.

    Raises:
        ValueError: ``data`` is not a valid safetensors file of supported dtypes.
        DTypeUnavailable: a tensor is BF16 and ``ml_dtypes`` is not installed (checked after
            the whole header is found valid).
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    size = len(view)
    if size < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > size - 8:
        raise ValueError(
            f"truncated safetensors file: the header claims {header_len} bytes, "
            f"but only {size - 8} follow the length"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"not a valid safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("invalid safetensors header: __metadata__ must map strings to strings")

    tensors = sorted(
        (_tensor_info(name, info) for name, info in header.items()), key=lambda t: t[3:5]
    )
    data_len = size - 8 - header_len
    expected_begin = 0
    for name, _, _, begin, end in tensors:
        if begin != expected_begin:
            gap = "overlaps the previous one" if begin < expected_begin else "leaves a gap"
            raise ValueError(
                f"invalid safetensors header: tensor {name!r} starts at {begin}, which {gap} "
                f"(expected {expected_begin}); data_offsets must be contiguous from 0"
            )
        expected_begin = end
    if expected_begin != data_len:
        what = "is truncated" if expected_begin > data_len else "has trailing bytes"
        raise ValueError(
            f"safetensors file {what}: the tensors need {expected_begin} data bytes, "
            f"the file has {data_len}"
        )

    start = 8 + header_len
    weights: Weights = {}
    for name, dtype_name, shape, begin, _ in sorted(tensors):
        count = math.prod(shape)
        dtype = _DECODE_DTYPES[dtype_name]
        if dtype_name == "BF16":
            bf16 = bfloat16_dtype(name)
            if sys.byteorder == "big":  # pragma: no cover - no big-endian machine at hand
                raw = np.frombuffer(view, dtype="<u2", count=count, offset=start + begin)
                array = raw.astype("=u2").view(bf16)
            else:
                array = np.frombuffer(view, dtype=bf16, count=count, offset=start + begin)
        else:
            array = np.frombuffer(view, dtype=dtype, count=count, offset=start + begin)
        weights[name] = array.reshape(shape)
    return weights, {str(k): v for k, v in metadata.items()}


_DECODE_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # its size; the arrays are of ml_dtypes.bfloat16
}


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        names = [k for k, _ in pairs]
        duplicate = next(k for k in names if names.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(name: str, info: object) -> tuple[str, str, tuple[int, ...], int, int]:
    """Validate one header entry; return (name, dtype name, shape, begin, end)."""
    where = f"invalid safetensors header: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where}: expected exactly the keys dtype, shape and data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in _DECODE_DTYPES:
        supported = ", ".join(_DECODE_DTYPES)
        raise ValueError(f"{where}: unsupported dtype {dtype_name!r} (supported: {supported})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(n) for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * _DECODE_DTYPES[dtype_name].itemsize
    if end - begin != nbytes:
        raise ValueError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, "
            f"but shape {shape} of {dtype_name} needs {nbytes}"
        )
    return name, dtype_name, tuple(shape), begin, end
