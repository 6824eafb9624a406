#!/usr/bin/env python3
"""Time from the last byte of a round's last upload to the new global model being downloadable.

Starts the release aggregator and coordinator on free ports with an all-zeros initial model of
SIZE bytes, drives two participants by hand over HTTP through R rounds, and for each round
records when the last upload's final chunk was handed to the socket and when the aggregator's
status first shows the new model (polled in a tight loop). Prints each round and the median.

    .venv/bin/python bench/close_latency.py --model-size 100MB --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import requests
from safetensors.numpy import save_file

from rondo.safetensors_io import encode_stream
from rondo.util import parse_size

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"


def start(binary: str, tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    addresses = tmp / f"{binary}.json"
    full_env = {
        **os.environ,
        "RONDO__API__PORT": "0",
        "RONDO__RPC__PORT": "0",
        "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
        **env,
    }
    log = open(tmp / f"{binary}.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [str(BIN / binary), "-c", str(ROOT / "configs" / f"dev-{binary}.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    for _ in range(600):
        if addresses.exists():
            return process, json.loads(addresses.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{binary} did not start")


class Participant:
    def __init__(self, url: str, name: str) -> None:
        self.url = url
        answer = requests.post(f"{url}/v1/participants", json={"name": name}, timeout=10).json()
        self.id, self.secret = answer["participant_id"], answer["secret"]

    def call(self, what: str) -> dict:
        response = requests.post(
            f"{self.url}/v1/participants/{self.id}/{what}",
            headers={"Authorization": f"Bearer {self.secret}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def wait_for_round(self, round_: int) -> dict:
        while True:
            action = self.call("heartbeat")
            if action["action"] == "train" and action["round"] == round_:
                return self.call("start_training")
            time.sleep(0.01)


class TimedStream:
    """The SDK's upload body (sized, so sent with a Content-Length, as the SDK does), noting
    when its last chunk has been taken by the socket."""

    def __init__(self, weights: dict, metadata: dict, stamp: dict) -> None:
        self.stream = encode_stream(weights, metadata)
        self.stamp = stamp

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator:
        yield from self.stream
        self.stamp["last_byte"] = time.perf_counter()


def upload(ticket: dict, weights: dict, n: int, stamp: dict) -> None:
    response = requests.post(
        ticket["upload_url"],
        data=TimedStream(weights, {"rondo.n_samples": str(n)}, stamp),
        headers={"Authorization": f"Bearer {ticket['token']}"},
        timeout=600,
    )
    response.raise_for_status()


def measure(
    model_size: int,
    rounds: int,
    aggregator_env: dict[str, str],
    show_log: bool = False,
    poll_interval: float = 0.0,
) -> tuple[list[float], float]:
    """Runs `rounds` rounds on a model of `model_size` bytes with the aggregator configured by
    `aggregator_env` (RONDO__... overrides); returns each round's close latency in ms and the
    aggregator's peak RSS in MB. The status is polled every `poll_interval` seconds (0: in a
    tight loop, which keeps a core busy between the poller and the aggregator's answers)."""
    n = model_size // 4
    zeros = {"dense/kernel": np.zeros(n - 16, np.float32), "dense/bias": np.zeros(16, np.float32)}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_file(zeros, str(tmp / "initial.safetensors"))
        processes = []
        try:
            aggregator, agg = start(
                "aggregator",
                tmp,
                {"RONDO__MODEL__INITIAL_MODEL": str(tmp / "initial.safetensors"), **aggregator_env},
            )
            processes.append(aggregator)
            coordinator, coord = start(
                "coordinator",
                tmp,
                {
                    "RONDO__AGGREGATOR__RPC_ADDRESS": agg["rpc"],
                    "RONDO__FEDERATION__ROUNDS": str(rounds),
                    "RONDO__FEDERATION__HEARTBEAT_TIMEOUT_SECS": "600",
                },
            )
            processes.append(coordinator)
            url = f"http://{coord['api']}"
            agg_status = f"http://{agg['api']}/v1/status"
            a, b = Participant(url, "a"), Participant(url, "b")
            updates = {k: v + np.float32(1) for k, v in zeros.items()}
            latencies = []
            poll = requests.Session()
            for round_ in range(1, rounds + 1):
                tickets = [p.wait_for_round(round_) for p in (a, b)]
                upload(tickets[0], updates, 1, {})
                stamp: dict[str, float] = {}
                seen: dict[str, float] = {}

                def watch(round_: int = round_, seen: dict = seen) -> None:
                    while True:
                        model = poll.get(agg_status, timeout=10).json()["model"]
                        if model and model["round"] == round_:
                            seen["ready"] = time.perf_counter()
                            return
                        if poll_interval:
                            time.sleep(poll_interval)

                watcher = threading.Thread(target=watch)
                watcher.start()
                upload(tickets[1], updates, 3, stamp)
                watcher.join()
                latency = (seen["ready"] - stamp["last_byte"]) * 1000
                latencies.append(latency)
                print(f"round {round_}: last byte -> new model downloadable: {latency:.1f} ms")
            status = Path(f"/proc/{aggregator.pid}/status").read_text()
            peak = next(line for line in status.splitlines() if line.startswith("VmHWM"))
            peak_mb = int(peak.split()[1]) / 1024
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)
            if show_log:
                print((tmp / "aggregator.log").read_text())
    return latencies, peak_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="100MB", type=parse_size)
    parser.add_argument("--rounds", default=5, type=int)
    parser.add_argument("--mode", default="blocked", choices=["blocked", "locked", "hogwild"])
    parser.add_argument("--show-log", action="store_true", help="print the aggregator's log")
    args = parser.parse_args()
    latencies, peak_mb = measure(
        args.model_size, args.rounds, {"RONDO__AGGREGATION__MODE": args.mode}, args.show_log
    )
    print(f"aggregator peak memory: {peak_mb:.0f} MB")
    print(
        f"model {args.model_size / 1e6:.0f} MB, mode {args.mode}: median "
        f"{statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms "
        f"over {len(latencies)} rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
