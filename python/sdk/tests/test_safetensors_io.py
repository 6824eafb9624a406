"""The safetensors encoding of weights, checked against the safetensors package."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from rondo import DTypeUnavailable, RondoError
from rondo.safetensors_io import decode, encode, encode_stream


def sample(dtype: str | np.dtype) -> dict[str, np.ndarray]:
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
    stream = encode_stream(weights, metadata)
    data = b"".join(stream)
    assert len(stream) == len(data), "the announced length is the file's"
    assert b"".join(stream) == data, "iterating again starts over"
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
    header = next(iter(encode_stream(weights, {"k": "v"})))
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


def build(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    """A safetensors file with exactly this header and data section (no checks)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_decode_is_zero_copy_and_writable_on_a_bytearray(dtype: str) -> None:
    weights = sample(dtype)
    buffer = bytearray(encode(weights, {"k": "v"}))
    decoded, metadata = decode(buffer)
    assert_same(decoded, weights)
    assert metadata == {"k": "v"}
    raw = np.frombuffer(buffer, np.uint8)
    for name, array in decoded.items():
        assert array.flags.writeable, name
        if array.size:
            assert np.shares_memory(array, raw), name
    before = bytes(buffer)
    decoded["dense/kernel"] += decoded["dense/kernel"].dtype.type(1)  # writes into the buffer
    assert bytes(buffer) != before
    np.testing.assert_array_equal(decode(buffer)[0]["dense/kernel"], decoded["dense/kernel"])


def test_decode_of_bytes_gives_read_only_views() -> None:
    data = encode(sample("float32"), {})
    for source in (data, memoryview(data)):
        decoded, _ = decode(source)
        assert not any(array.flags.writeable for array in decoded.values())
        assert np.shares_memory(decoded["dense/kernel"], np.frombuffer(data, np.uint8))
    decoded, _ = decode(memoryview(bytearray(data)))
    assert all(array.flags.writeable for array in decoded.values())


def test_decode_matches_safetensors_on_unaligned_offsets() -> None:
    # An odd number of float16s puts the next tensor off its natural alignment.
    weights = {"a": np.arange(3, dtype=np.float16), "b": np.arange(5, dtype=np.float64)}
    data = safetensors.numpy.save(weights)
    assert_same(decode(bytearray(data))[0], safetensors.numpy.load(data))


BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_file(values: np.ndarray, name: str = "w") -> bytes:
    """A safetensors file of one BF16 tensor, built by hand from float32 values that BF16
    holds exactly (its bits are the top half of theirs)."""
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    tensor = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [0, bits.nbytes]}
    return build({"__metadata__": {"m": "1"}, name: tensor}, bits.tobytes())


EXACT_IN_BF16 = np.array([[1.0, -2.5], [0.15625, -(2.0**127)]], dtype=np.float32)


def test_decode_keeps_bf16_as_bfloat16_views() -> None:
    buffer = bytearray(bf16_file(EXACT_IN_BF16))
    decoded, metadata = decode(buffer)
    array = decoded["w"]
    assert array.dtype == BF16 and array.shape == (2, 2)
    np.testing.assert_array_equal(array.astype(np.float32), EXACT_IN_BF16)
    assert metadata == {"m": "1"}
    # Zero-copy and writable, like the other dtypes.
    assert array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(buffer, np.uint8))


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_half_precision_round_trips_in_its_own_dtype(dtype: np.dtype) -> None:
    weights = sample(dtype)
    data = encode(weights, {"rondo.n_samples": "3"})
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    wire = "F16" if dtype == np.float16 else "BF16"
    assert {header[name]["dtype"] for name in weights} == {wire}
    decoded, metadata = decode(bytearray(data))
    assert_same(decoded, weights)
    assert metadata == {"rondo.n_samples": "3"}
    # What a participant does with a downloaded model, and then sends back: still that dtype.
    trained = {k: v + v.dtype.type(1) for k, v in decoded.items()}
    again, _ = decode(encode(trained, {}))
    assert all(again[k].dtype == dtype for k in weights)
    assert_same(again, trained)


def test_bf16_bytes_are_the_top_halves_of_float32() -> None:
    array = EXACT_IN_BF16.astype(BF16)
    expected_bits = (EXACT_IN_BF16.view(np.uint32) >> 16).astype("<u2").tobytes()
    for weights in ({"w": array}, {"w": np.asfortranarray(array)}):  # strided: made C order
        data = encode(weights, {"m": "1"})
        header_len = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_len])
        assert header["w"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}
        assert data[8 + header_len :] == expected_bits


def test_bf16_without_ml_dtypes_is_refused_naming_the_tensor(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` now fails
    with pytest.raises(DTypeUnavailable) as info:
        decode(bf16_file(EXACT_IN_BF16, name="layer/kernel"))
    assert isinstance(info.value, RondoError)
    assert (info.value.tensor, info.value.dtype) == ("layer/kernel", "BF16")
    message = str(info.value)
    assert "'layer/kernel'" in message
    assert "pip install ml_dtypes" in message and "pip install rondo[bf16]" in message
    # The other dtypes need nothing more.
    assert_same(decode(encode(sample("float16"), {}))[0], sample("float16"))


def test_a_malformed_bf16_file_is_still_a_value_error_without_ml_dtypes(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(ValueError, match="needs 8"):
        decode(build({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)))


def test_ml_dtypes_is_imported_only_for_bf16_tensors() -> None:
    code = (
        "import sys, numpy as np, rondo\n"
        "from rondo.safetensors_io import decode, encode\n"
        "data = encode({'a': np.ones(3, np.float32), 'b': np.ones(2, np.float16)}, {})\n"
        "decode(bytearray(data))\n"
        "assert 'ml_dtypes' not in sys.modules, 'imported without a BF16 tensor'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": f32([2], 4, 12)}, bytes(8), "starts at 4.*gap"),  # not from 0
        ({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, bytes(12), "gap"),
        ({"a": f32([2], 0, 8), "b": f32([1], 4, 8)}, bytes(8), "overlaps"),
        ({"a": f32([2], 0, 4)}, bytes(4), "needs 8"),  # wrong size for the shape
        ({"a": f32([2], 8, 0)}, bytes(8), "begin <= end"),
        ({"a": f32([2], 0, 8)}, bytes(4), "truncated"),
        ({"a": f32([2], 0, 8)}, bytes(9), "trailing bytes"),
        ({"a": f32([-1], 0, 0)}, b"", "non-negative"),
        ({"a": f32([True], 0, 4)}, bytes(4), "non-negative integers"),
        ({"a": f32([1.0], 0, 4)}, bytes(4), "non-negative integers"),
        ({"a": f32([1], 0, 4.0)}, bytes(4), "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4), "data_offsets"),
        ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "I64"),
        ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "keys"),
        ({"a": {**f32([1], 0, 4), "extra": 1}}, bytes(4), "keys"),
        ({"a": [1, 2]}, b"", "keys"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ({"__metadata__": ["k"]}, b"", "__metadata__"),
    ],
)
def test_decode_rejects_malformed_headers(header: dict, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode(build(header, data))


def test_decode_rejects_malformed_framing() -> None:
    good = encode({"w": np.ones(3, np.float32)}, {})
    for bad in (good[:7], good[:20], good[:-1], good + b"\0"):
        with pytest.raises(ValueError):
            decode(bad)
    with pytest.raises(ValueError, match="header claims"):
        decode(build({}, b"", header_len=10**6))
    with pytest.raises(ValueError, match="not a JSON object"):
        decode(build([], b""))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid safetensors header"):
        decode(struct.pack("<Q", 2) + b"\xff{")
    entry = b'{"dtype":"F32","shape":[],"data_offsets":[0,4]}'
    text = b'{"a":' + entry + b',"a":' + entry + b"}"
    with pytest.raises(ValueError, match="duplicate"):
        decode(struct.pack("<Q", len(text)) + text + bytes(4))


def test_decode_of_an_empty_model() -> None:
    assert decode(build({}, b"")) == ({}, {})
    assert decode(safetensors.numpy.save({}))[0] == {}
