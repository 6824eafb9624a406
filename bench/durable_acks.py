#!/usr/bin/env python3
"""What durable acknowledgements cost: the same Rondo federation in memory, with a data
directory only (the model store), and with a Redis store plus a data directory (every accepted
update also written and fsynced under store.data_dir, and its record saved in Redis, before its
upload is answered).

Runs the workload (compare_flower.py's: N clients, a float32 model of SIZE bytes, R rounds)
``--repeat`` times per store, alternating, against one redis-server started here on a free
port (``--save "" --appendonly no``: Redis itself is not what is measured), and prints the
median wall time, mean round time and peak server memory of each, with their ratio.

    bench/.venv/bin/python bench/durable_acks.py --workload 10,10MB,3 --repeat 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import compare_flower as bench

# In memory; a data directory only (the model store: each round's model written and fsynced);
# Redis and a data directory (also every accepted update written, fsynced and recorded before
# its upload is answered).
MODES = ("memory", "models", "durable")


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is missing: scripts/setup --test-tools installs it")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ping = subprocess.run(
            ["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True, check=False
        )
        if ping.stdout.strip() == "PONG":
            return process
        time.sleep(0.05)
    process.kill()
    sys.exit(f"redis-server did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", type=bench.parse_workload, default="10,10MB,3")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    w = args.workload
    logs = Path(tempfile.mkdtemp(prefix="rondo-durable-"))
    port = bench.free_port()
    redis = start_redis(port, logs / "redis.log")
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in MODES}
    try:
        for attempt in range(args.repeat):
            for label in MODES:
                run_dir = logs / f"run{attempt + 1}" / label
                env: dict[str, str] = {}
                if label != "memory":
                    env["RONDO__STORE__DATA_DIR"] = str(run_dir / "data")
                if label == "durable":
                    env["RONDO__STORE__URL"] = f"redis://127.0.0.1:{port}/0"
                    env["RONDO__STORE__NAMESPACE"] = f"bench{attempt}"
                deadline = time.monotonic() + args.timeout
                runner = lambda w, d, t, env=env: bench.run_rondo(w, d, t, env)  # noqa: E731
                result = bench.run_one(f"Rondo, {label} store", runner, w, run_dir, deadline)
                if "error" in result or not result["check"]["ok"]:
                    print(f"{label} run failed: {result.get('error', result['check'])}")
                    print(f"logs kept in {logs}")
                    return 1
                runs[label].append(result)
    finally:
        redis.kill()
        redis.wait()

    def figures(results: list[dict[str, Any]]) -> dict[str, float]:
        return {
            "wall": statistics.median(r["wall_secs"] for r in results),
            "round": statistics.median(statistics.mean(r["round_secs"]) for r in results),
            "peak": max(r["server_peak_bytes"] for r in results) / bench.MB,
        }

    memory, models, durable = (figures(runs[label]) for label in MODES)
    print(f"\n{w.clients} clients x {w.label} x {w.rounds} rounds, {args.repeat} runs each\n")
    print(
        "| | in memory | data_dir only (model store) | Redis + data_dir (durable acks) "
        "| models / memory | durable / memory |"
    )
    print("|---|---|---|---|---|---|")
    for key, name, unit in (
        ("wall", "wall time, median", " s"),
        ("round", "mean round time, median", " s"),
        ("peak", "server peak RSS (both services)", " MB"),
    ):
        print(
            f"| {name} | {memory[key]:.3f}{unit} | {models[key]:.3f}{unit} | "
            f"{durable[key]:.3f}{unit} | {models[key] / memory[key]:.2f}x | "
            f"{durable[key] / memory[key]:.2f}x |"
        )
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
