#!/usr/bin/env python3
"""10,000 participants joining one coordinator and heartbeating once a second, on loopback.

Builds the release coordinator and the load generator (``bench/loadgen``, Rust: one keep-alive
connection per participant), starts the coordinator on free loopback ports with no aggregator
(``federation.min_clients`` above the participants, so no round ever opens and every heartbeat
is answered at once), runs the generator, and samples both processes from ``/proc``: the
coordinator's RSS (``VmRSS`` every 0.2 s, and ``VmHWM``, its peak) and the CPU (``utime +
stime``) of each over the measured window, as a percentage of one core. Prints one table.

    python3 bench/heartbeat_load.py                      # 10,000 participants, 60 s
    python3 bench/heartbeat_load.py --participants 2000 --duration 20 --json-out r.json

``--with-aggregator`` attaches an aggregator as well (still no round): the coordinator's
driver then ticks, as it does in a federation.

``--mode long-poll`` measures the SDK's long polls instead: an aggregator is started too (with
an initial model, so the first round selects everyone), the round opens once every participant
has joined, and each selected participant that does not train misses the training deadline,
so the attempt fails and the next opens: each opening and each failure is news for all of
them. For each, the table gives when the participants heard it, counted from the first one
that did.

Only the standard library: any ``python3`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_secs(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler(threading.Thread):
    """The highest VmRSS seen, sampled every `interval` seconds while the process lives."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return


def raise_fd_limit() -> None:
    """Each keep-alive connection is an fd on both sides: the children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def write_initial_model(path: Path) -> None:
    """A four-float safetensors file, written by hand: the driver needs no numpy."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def set_group_nice(pid: int, nice: int | None) -> None:
    """The nice value of the process's autogroup (its session's share of the CPU against other
    sessions'): with autogroup scheduling, a task's own nice counts only within its session."""
    if nice is None:
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError as exc:  # no autogroups, or no right to raise a priority
        print(f"warning: could not set the autogroup nice of {pid}: {exc}", file=sys.stderr)


def start(binary: Path, tmp: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    addresses = tmp / f"{name}.json"
    full_env = {
        **os.environ,
        "RONDO__API__PORT": "0",
        "RONDO__RPC__PORT": "0",
        "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
        **env,
    }
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [str(binary), "-c", str(ROOT / "configs" / f"dev-{name}.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
        # A session of its own, as a separately started service has: with the kernel's
        # autogroup scheduling, a session's share of the CPU against other sessions' work.
        start_new_session=True,
    )
    for _ in range(600):
        if addresses.exists() and addresses.read_text().strip():
            return process, json.loads(addresses.read_text())
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start; see {tmp / f'{name}.log'}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(args: argparse.Namespace, bin_dir: Path, tmp: Path) -> dict:
    raise_fd_limit()
    processes: list[subprocess.Popen] = []
    try:
        coordinator_env = {
            # No round opens: every heartbeat is answered at once.
            "RONDO__FEDERATION__MIN_CLIENTS": str(max(20_000, args.participants + 1)),
            "RONDO__FEDERATION__HEARTBEAT_TIMEOUT_SECS": "10",
            # Every participant comes from the generator's one loopback address, where the
            # federation would have 10,000 hosts: no per-address join limit.
            "RONDO__LIMITS__JOINS_PER_SECOND_PER_ADDRESS": "0",
        }
        if args.mode == "long-poll" or args.with_aggregator:
            write_initial_model(tmp / "initial.safetensors")
            aggregator, agg = start(
                bin_dir / "aggregator",
                tmp,
                "aggregator",
                {"RONDO__MODEL__INITIAL_MODEL": str(tmp / "initial.safetensors")},
            )
            processes.append(aggregator)
            # Attached, the coordinator's driver ticks (every 200 ms, under the federation's
            # lock) as it does in a federation; plain mode still opens no round.
            coordinator_env["RONDO__AGGREGATOR__RPC_ADDRESS"] = agg["rpc"]
        if args.mode == "long-poll":
            coordinator_env |= {
                # The round opens once everyone has joined, and fails (no update) after this:
                # two changes, each heard by every participant, per attempt.
                "RONDO__FEDERATION__MIN_CLIENTS": str(args.participants),
                "RONDO__FEDERATION__TRAINING_TIMEOUT_SECS": str(args.training_timeout),
                "RONDO__FEDERATION__ROUND_TIMEOUT_SECS": str(args.training_timeout),
                "RONDO__FEDERATION__EVALUATE_EVERY": "0",
            }
        for setting in args.coordinator_setting:
            key, _, value = setting.partition("=")
            coordinator_env["RONDO__" + key.upper().replace(".", "__")] = value
        coordinator, addresses = start(bin_dir / "coordinator", tmp, "coordinator", coordinator_env)
        processes.append(coordinator)
        set_group_nice(coordinator.pid, args.group_nice)
        rss = RssSampler(coordinator.pid)
        rss.start()
        load_before = uptime()
        report_path = tmp / "loadgen.json"
        command = [
            str(bin_dir / "loadgen"),
            "--addr",
            addresses["api"],
            "--participants",
            str(args.participants),
            "--join-concurrency",
            str(args.join_concurrency),
            "--warmup-secs",
            str(args.warmup),
            "--duration-secs",
            str(args.duration),
            "--mode",
            args.mode,
            "--json-out",
            str(report_path),
        ]
        if args.generator_threads:
            command += ["--threads", str(args.generator_threads)]
        generator = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        processes.append(generator)
        set_group_nice(generator.pid, args.group_nice)
        marks: dict[str, tuple[float, float, float]] = {}
        assert generator.stdout is not None
        for line in generator.stdout:
            if line.strip() in ("measuring", "measured"):
                marks[line.strip()] = (
                    time.monotonic(),
                    cpu_secs(coordinator.pid),
                    cpu_secs(generator.pid),
                )
                if line.strip() == "measuring":
                    rss_at_start = status_kb(coordinator.pid, "VmRSS")
                else:
                    rss_at_end = status_kb(coordinator.pid, "VmRSS")
        if generator.wait() != 0:
            raise RuntimeError(f"loadgen exited with {generator.returncode}")
        hwm = status_kb(coordinator.pid, "VmHWM")
        rss.stop.set()
        load_after = uptime()
        (t0, c0, g0), (t1, c1, g1) = marks["measuring"], marks["measured"]
        return {
            "loadgen": json.loads(report_path.read_text()),
            "coordinator": {
                "cpu_percent": 100 * (c1 - c0) / (t1 - t0),
                "rss_mb_window_start": rss_at_start / 1024,
                "rss_mb_window_end": rss_at_end / 1024,
                "rss_mb_sampled_peak": rss.peak_kb / 1024,
                "vm_hwm_mb": hwm / 1024,
            },
            "generator_cpu_percent": 100 * (g1 - g0) / (t1 - t0),
            "uptime_before": load_before,
            "uptime_after": load_after,
            "command": " ".join(sys.argv),
        }
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()


def table(result: dict) -> str:
    gen, coord = result["loadgen"], result["coordinator"]
    join = gen["join"]
    rows = [
        ("participants joined", f"{gen['joined']:,} of {gen['participants']:,}"),
        (
            "join throughput",
            f"{join['per_sec']:,.0f} joins/s ({join['secs']:.2f} s, "
            f"{join['concurrency']} in flight)",
        ),
        (
            "join latency p50 / p99 / max",
            f"{join['latency']['p50_ms']:.2f} / {join['latency']['p99_ms']:.2f} / "
            f"{join['latency']['max_ms']:.2f} ms",
        ),
    ]
    if gen["mode"] == "plain":
        hb, late = gen["heartbeat"], gen["lateness"]
        rows += [
            (
                "heartbeats answered",
                f"{gen['heartbeats_ok']:,} of {gen['heartbeats_expected']:,.0f} scheduled "
                f"({gen['heartbeats_per_sec']:,.0f}/s over {gen['window_secs']:.0f} s)",
            ),
            (
                "heartbeat latency p50 / p99 / p99.9 / max",
                f"{hb['p50_ms']:.2f} / {hb['p99_ms']:.2f} / {hb['p999_ms']:.2f} / "
                f"{hb['max_ms']:.2f} ms",
            ),
            (
                "generator lateness p50 / p99 / max",
                f"{late['p50_ms']:.2f} / {late['p99_ms']:.2f} / {late['max_ms']:.2f} ms "
                f"({gen['missed_slots']} slots missed)",
            ),
        ]
    else:
        rows.append(("long polls answered unchanged", f"{gen['held_polls_answered_unchanged']:,}"))
        # Only the openings: each attempt's state is new, so all hear it. The standby between
        # two attempts lasts one driver tick, and a participant whose poll was out then may
        # hear the next opening straight away.
        for news in (n for n in gen["news"] if n["state"].startswith("train:")):
            after = news["after_first"]
            rows.append(
                (
                    f"{news['state'].split()[0]} opened: heard by, after the first p50 / p99 / max",
                    f"{news['heard_by']:,}: {after['p50_ms']:.1f} / {after['p99_ms']:.1f} / "
                    f"{after['max_ms']:.1f} ms",
                )
            )
    errors = {**join["errors"], **gen["errors"]}
    rows += [
        ("errors", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"),
        (
            "coordinator RSS: window start / end / peak (VmHWM)",
            f"{coord['rss_mb_window_start']:.0f} / {coord['rss_mb_window_end']:.0f} / "
            f"{coord['vm_hwm_mb']:.0f} MB",
        ),
        ("coordinator CPU over the window", f"{coord['cpu_percent']:.0f} % of one core"),
        (
            "load generator CPU over the window",
            f"{result['generator_cpu_percent']:.0f} % of one core",
        ),
    ]
    lines = ["| Figure | Value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the joins")
    parser.add_argument("--join-concurrency", type=int, default=32)
    parser.add_argument("--mode", choices=["plain", "long-poll"], default="plain")
    parser.add_argument(
        "--with-aggregator",
        action="store_true",
        help="plain mode: attach an aggregator too (the driver then ticks; still no round)",
    )
    parser.add_argument(
        "--training-timeout", type=float, default=8.0, help="long-poll mode: seconds per attempt"
    )
    parser.add_argument(
        "--coordinator-setting",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="another coordinator setting, e.g. api.max_connections=20000",
    )
    parser.add_argument(
        "--generator-threads", type=int, help="the load generator's tokio workers (default: 1)"
    )
    parser.add_argument(
        "--group-nice",
        type=int,
        help="the autogroup nice of the coordinator's and the generator's sessions (e.g. -5, "
        "so that nice-19 work in other sessions yields to them as nice 19 means)",
    )
    parser.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    parser.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    if not args.no_build:
        packages = ["rondo-coordinator", "loadgen"]
        if args.mode == "long-poll" or args.with_aggregator:
            packages.append("rondo-aggregator")
        # One at a time: built together, cargo would unify their features (the generator's
        # hyper client) and rebuild the services as they are never shipped.
        for package in packages:
            subprocess.run(["cargo", "build", "--release", "-p", package], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(prefix="rondo-load-") as tmp:
        result = measure(args, args.bin_dir, Path(tmp))
    result["table"] = table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(f"before: {result['uptime_before']}\nafter:  {result['uptime_after']}")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
