"""A config that cannot be used stops the binary at start-up with exit code 2 and a one-line
message naming the key at fault, never a panic, whatever the value: negative, zero, NaN,
infinite, out of range, of the wrong type, or a key that does not exist."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN_DIR, ROOT


def start(binary: str, tmp: Path, env: dict[str, str], config: Path | None = None):
    """Runs `binary` with `env` over the dev config; returns (exit code, output). A binary that
    is still running after 10 s took the config, and is stopped."""
    full_env = {
        **os.environ,
        "RONDO__API__PORT": "0",
        "RONDO__RPC__PORT": "0",
        "RONDO__RUNTIME__ADDRESSES_FILE": str(tmp / f"{binary}.addresses.json"),
        **env,
    }
    config = config or ROOT / "configs" / f"dev-{binary}.toml"
    process = subprocess.Popen(
        [str(BIN_DIR / binary), "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
    )
    try:
        stdout, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{binary} started with {env}:\n{stderr.decode(errors='replace')[-2000:]}")
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


C, A = "coordinator", "aggregator"
BAD_VALUES = [
    # The two that panicked in `Duration::from_secs_f64`.
    (C, "RONDO__FEDERATION__ROUND_TIMEOUT_SECS", "1e300"),
    (A, "RONDO__LINK__CALL_TIMEOUT_SECS", "inf"),
    (C, "RONDO__FEDERATION__ROUND_TIMEOUT_SECS", "nan"),
    (C, "RONDO__FEDERATION__HEARTBEAT_PERIOD_SECS", "-1"),
    (C, "RONDO__FEDERATION__HEARTBEAT_TIMEOUT_SECS", "0"),
    (C, "RONDO__AGGREGATOR__CALL_TIMEOUT_SECS", "inf"),
    (C, "RONDO__AGGREGATOR__CALL_TIMEOUT_SECS", "soon"),
    (C, "RONDO__FEDERATION__PARTICIPANTS_RATIO", "1.5"),
    (C, "RONDO__FEDERATION__PARTICIPANTS_RATIO", "0"),
    (C, "RONDO__FEDERATION__MIN_CLIENTS", "0"),
    (C, "RONDO__FEDERATION__ROUNDS", "2.5"),
    (C, "RONDO__FEDERATION__ROUNDS", "many"),
    (C, "RONDO__API__PORT", "70000"),
    (C, "RONDO__AGGREGATOR__RPC_ADDRESS", "nowhere"),
    (A, "RONDO__API__UPLOAD_IDLE_TIMEOUT_SECS", "1e300"),
    (A, "RONDO__API__UPLOAD_IDLE_TIMEOUT_SECS", "-inf"),
    (A, "RONDO__LINK__CALL_TIMEOUT_SECS", "0"),
    (A, "RONDO__API__MAX_BODY_BYTES", "0"),
    (A, "RONDO__API__MAX_BODY_BYTES", "-1"),
    (A, "RONDO__AGGREGATION__STAGING_MEMORY_BYTES", "0"),
    (A, "RONDO__AGGREGATION__DETERMINISTIC", "5"),
    (A, "RONDO__API__PUBLIC_URL", "agg:8091"),
]
UNKNOWN_KEYS = [
    (C, "RONDO__FEDERATION__ROUNDZ", "roundz"),
    (C, "RONDO__FEDERATIONS__ROUNDS", "federations"),
    (A, "RONDO__API__MAX_BODY_BYTEZ", "max_body_bytez"),
]


def assert_refused(binary: str, code: int, stdout: str, stderr: str, named: str) -> None:
    output = stdout + stderr
    assert "panicked" not in output, output
    assert code == 2, output
    assert stderr.startswith(f"{binary}: invalid config: "), stderr
    assert named in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(("binary", "var", "value"), BAD_VALUES)
def test_a_bad_value_stops_the_binary_with_exit_code_2_naming_the_key(tmp_path, binary, var, value):
    key = var.removeprefix("RONDO__").lower().replace("__", ".")
    code, stdout, stderr = start(binary, tmp_path, {var: value})
    assert_refused(binary, code, stdout, stderr, key)
    assert not (tmp_path / f"{binary}.addresses.json").exists()


@pytest.mark.parametrize(("binary", "var", "name"), UNKNOWN_KEYS)
def test_an_unknown_key_stops_the_binary_with_exit_code_2_naming_it(tmp_path, binary, var, name):
    code, stdout, stderr = start(binary, tmp_path, {var: "1"})
    assert_refused(binary, code, stdout, stderr, f"`{name}`")


@pytest.mark.parametrize("binary", ["coordinator", "aggregator"])
def test_an_unknown_key_in_a_config_file_is_refused_by_name(tmp_path, binary):
    config = tmp_path / "bad.toml"
    config.write_text("[api]\nprot = 8081\n")
    code, stdout, stderr = start(binary, tmp_path, {}, config=config)
    assert_refused(binary, code, stdout, stderr, "`prot`")
