"""10,000 heartbeating participants against one coordinator with an aggregator attached
(RONDO_LONG_TESTS=1; about a minute, with the release build of this checkout). The bounds the
project promises on its 2-core machine, load generator included: heartbeat p99 within 20 ms,
the coordinator's RSS within 200 MB, and no error. `bench/heartbeat_load.py` is the benchmark;
this runs it shorter. Run it on a quiet machine: the bound leaves no room for a build in
another session taking one of the two cores.

    RONDO_LONG_TESTS=1 .venv/bin/python -m pytest -s tests/e2e/test_load.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not os.environ.get("RONDO_LONG_TESTS"), reason="set RONDO_LONG_TESTS=1")
def test_ten_thousand_heartbeating_participants(tmp_path):
    out = tmp_path / "load.json"
    # The driver builds and uses this checkout's release binaries (target/release).
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "heartbeat_load.py"),
            "--participants",
            "10000",
            "--duration",
            "20",
            # Other sessions' nice-19 work (a fuzzer, say) yields to the two sessions under
            # test as nice 19 means; with autogroup scheduling it would otherwise take an
            # equal share of the two cores (docs/benchmarks.md).
            "--group-nice",
            "-5",
            # Attached, the coordinator's driver ticks as in a federation (no round opens).
            "--with-aggregator",
            "--json-out",
            str(out),
        ],
        check=True,
        timeout=900,
    )
    result = json.loads(out.read_text())
    generator = result["loadgen"]
    assert generator["joined"] == 10_000
    assert generator["join"]["errors"] == {}
    assert generator["errors"] == {}
    assert generator["unfinished_at_end"] == 0
    # Every slot kept: a generator that fell behind would send fewer, and hide latency.
    assert generator["missed_slots"] == 0
    assert generator["heartbeats_ok"] >= 0.99 * generator["heartbeats_expected"]
    assert generator["heartbeat"]["p99_ms"] <= 20.0
    assert result["coordinator"]["vm_hwm_mb"] <= 200.0
