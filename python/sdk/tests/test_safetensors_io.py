"""The safetensors encoding of weights, checked against the safetensors package."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from rondo.safetensors_io import decode, encode, encode_stream


def sample(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((3, 5)).astype(dtype),
        "dense/bias": rng.standard_normal(7).astype(dtype),
        "scalar": np.array(1.5, dtype=dtype),
        "empty": np.zeros((0, 2), dtype=dtype),
    }


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype
        assert actual[name].shape == array.shape
        np.testing.assert_array_equal(actual[name], array)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("metadata", [{}, {"rondo.n_samples": "12", "rondo.metrics": "{}"}])
def test_round_trip(dtype: str, metadata: dict[str, str]) -> None:
    weights = sample(dtype)
    data = b"".join(encode_stream(weights, metadata))
    assert_same(safetensors.numpy.load(data), weights)
    decoded, decoded_metadata = decode(data)
    assert_same(decoded, weights)
    assert decoded_metadata == metadata


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_decodes_files_written_by_safetensors(dtype: str) -> None:
    weights = sample(dtype)
    weights.pop("empty")
    data = safetensors.numpy.save(weights, metadata={"rondo.round": "3"})
    decoded, metadata = decode(data)
    assert_same(decoded, weights)
    assert metadata == {"rondo.round": "3"}
    assert decode(safetensors.numpy.save(weights))[1] == {}


def test_header_layout() -> None:
    weights = {"b": np.ones(2, np.float32), "a": np.ones((1, 3), np.float64)}
    header = next(encode_stream(weights, {"k": "v"}))
    (length,) = struct.unpack("<Q", header[:8])
    assert len(header) == 8 + length and length % 8 == 0
    text = header[8:].decode()
    json_end = text.rindex("}") + 1
    assert set(text[json_end:]) <= {" "}  # padded with spaces only
    parsed = json.loads(text)
    assert list(parsed) == ["__metadata__", "a", "b"]
    assert parsed["__metadata__"] == {"k": "v"}
    assert parsed["a"] == {"dtype": "F64", "shape": [1, 3], "data_offsets": [0, 24]}
    assert parsed["b"] == {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}


def test_stream_shares_memory_with_the_arrays() -> None:
    array = np.arange(1000, dtype=np.float32)
    pieces = list(encode_stream({"w": array}, {}, chunk_bytes=1024))
    assert all(isinstance(p, memoryview) for p in pieces[1:])
    assert [len(p) for p in pieces[1:]] == [1024, 1024, 1024, 928]
    assert all(np.shares_memory(np.frombuffer(p, np.uint8), array) for p in pieces[1:])


def test_big_endian_and_non_contiguous_arrays_are_converted() -> None:
    weights = {
        "be": np.arange(4, dtype=">f4"),
        "transposed": np.arange(6, dtype=np.float64).reshape(2, 3).T,
    }
    decoded, _ = decode(encode(weights, {}))
    np.testing.assert_array_equal(decoded["be"], np.arange(4, dtype=np.float32))
    assert decoded["be"].dtype == np.float32
    np.testing.assert_array_equal(decoded["transposed"], weights["transposed"])


def test_rejects_unsupported_dtypes_and_reserved_names() -> None:
    with pytest.raises(TypeError, match="int64"):
        encode_stream({"w": np.arange(3)}, {})
    with pytest.raises(ValueError, match="reserved"):
        encode_stream({"__metadata__": np.zeros(1, np.float32)}, {})


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        decode(b"\x01")
    with pytest.raises(ValueError):
        decode(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
