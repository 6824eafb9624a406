"""The dummy example's model and participants (its network side is run_participant's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

DUMMY = Path(__file__).resolve().parents[2] / "client_examples" / "dummy.py"


@pytest.fixture(scope="module")
def dummy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dummy", DUMMY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("n", "kernel", "bias"), [(1, 1, 0), (2, 1, 1), (40, 24, 16), (250, 234, 16)]
)
def test_layout(dummy: ModuleType, n: int, kernel: int, bias: int) -> None:
    expected = {"dense/kernel": kernel} | ({"dense/bias": bias} if bias else {})
    assert dummy.layout(n) == expected


def test_dummy_participant(dummy: ModuleType) -> None:
    participant = dummy.Dummy(2, 100)
    initial = participant.initial_weights()
    assert {k: (v.dtype, v.shape) for k, v in initial.items()} == {
        "dense/kernel": (np.dtype(np.float32), (84,)),
        "dense/bias": (np.dtype(np.float32), (16,)),
    }
    assert all(not v.any() for v in initial.values())
    new, n_samples, metrics = participant.train_round(initial, 4)
    assert n_samples == 30 and metrics == {"loss": 0.25}
    assert all(v.dtype == np.float32 and (v == 3).all() for v in new.values())


@pytest.mark.parametrize("size", ["2B", "10XB", "", "1 parsec"])
def test_bad_model_size_is_an_argparse_error(
    dummy: ModuleType, size: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dummy.parse_args([f"--model-size={size}"])
    assert exit_info.value.code == 2
    assert "--model-size" in capsys.readouterr().err


def test_model_size_units(dummy: ModuleType) -> None:
    assert dummy.parse_args(["--model-size", "1kB"]).model_size == 1000
    assert dummy.parse_args(["--model-size", "1KiB"]).model_size == 1024
