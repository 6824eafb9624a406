#!/usr/bin/env python3
"""Runs the same federation through Rondo and through Flower and compares them.

Every workload N,SIZE,R runs N clients on one float32 model of SIZE bytes for R rounds of
FedAvg from an all-zero model, where client i adds i + 1 to every weight and reports
10 * (i + 1) samples (dummy.py's arithmetic), first through Rondo (release coordinator and
aggregator, and each client a process running ``run_participant``), then through Flower 1.41
(legacy ``start_server`` with FedAvg, and each client a process running ``start_client``), as
a federation runs: every participant its own program. ``--client-processes 1`` runs all
clients as threads of one process instead (for both systems). Measured:
total wall time from starting the server process(es) until every client has finished and the
final model is in place, the mean round time, the server processes' peak RSS (VmHWM), and
whether the final model equals the expected weighted average. After each run, the same client
processes are started once more, each exiting as soon as its script's imports are done
(``--import-only``): the wall time of the clients' importing alone, which the federation's
wall time includes. (Flower's ``start_client`` imports more on first use, fastapi and pydantic
among it; that falls in Flower's wall time beyond importing.)

Each system runs ``--repeat`` times per workload (3 by default), the two alternating; the
tables show the run of median wall time of each (with the highest peak memory of any run).

    bench/run                                   # setup, then the three default workloads
    bench/run --workload 2,1MB,2 --rondo-only   # anything after bench/run goes here

Times drift with machine load; compare the two systems through the ratios of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

# Neither system uses BLAS here, but numpy's OpenBLAS starts a worker thread per core at import
# that spins for a while: in every client process while it starts, and in this one while the
# first run starts. Set before numpy is imported (by the modules below); every child inherits it.
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import requests  # noqa: E402 - after the environment above
import safetensors.numpy  # noqa: E402
import workload  # noqa: E402

from rondo.safetensors_io import decode  # noqa: E402
from rondo.util import parse_size  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TARGET = REPO / "target" / "release"
DEFAULT_WORKLOADS = ["10,10MB,3", "100,1MB,3", "2,1GB,1"]
MB = 1_000_000  # sizes are decimal throughout, like parse_size's "MB"
# gRPC caps messages at 2 GiB - 1 (a signed 32-bit length): the most Flower can be given.
GRPC_MAX_MESSAGE = 2**31 - 1
FLOWER_TOO_LARGE = "not run (model too large for its in-memory design on this machine)"


class Aborted(Exception):
    """A run went past its deadline or a process died; the message says which."""


@dataclass(frozen=True)
class Workload:
    clients: int
    size: int  # bytes
    rounds: int
    label: str  # as given, e.g. "10MB"
    client_processes: int = 0  # the clients are spread over this many processes; 0: one each

    def client_groups(self) -> list[tuple[int, int]]:
        """(first index, count) of the clients of each client process."""
        processes = min(self.client_processes or self.clients, self.clients)
        bounds = [self.clients * k // processes for k in range(processes + 1)]
        return [(bounds[k], bounds[k + 1] - bounds[k]) for k in range(processes)]

    @property
    def n_elements(self) -> int:
        return self.size // 4

    @property
    def name(self) -> str:
        name = f"{self.clients} clients, {self.label} model, {self.rounds} rounds"
        processes = len(self.client_groups())
        if processes > 1:
            name += f", clients in {processes} processes"
        return name


def parse_workload(text: str) -> Workload:
    try:
        clients, size, rounds = text.split(",")
        workload_ = Workload(int(clients), parse_size(size), int(rounds), size.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N,SIZE,ROUNDS such as 10,10MB,3; got {text!r}"
        ) from None
    if workload_.clients < 1 or workload_.rounds < 1 or workload_.size < 4:
        raise argparse.ArgumentTypeError(f"N and ROUNDS must be >= 1 and SIZE >= 4B: {text!r}")
    return workload_


# --- processes -------------------------------------------------------------------------------


class Processes:
    """The child processes of one run, all stopped by ``stop_all`` whatever happened."""

    def __init__(self, log_dir: Path, deadline: float) -> None:
        self.log_dir = log_dir
        self.deadline = deadline
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[TextIO] = []
        self.cpu_secs: dict[str, float] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop_all
        self.logs.append(log)
        self.running[name] = subprocess.Popen(
            argv,
            cwd=BENCH,  # the child scripts import workload.py from here
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self.running[name].pid

    def check_alive(self, name: str) -> None:
        code = self.running[name].poll()
        if code is not None:
            raise Aborted(f"{name} exited with status {code}; see {self.log_dir / name}.log")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Aborted("timed out")
        return left

    def wait(self, name: str) -> int:
        """Wait for a process to exit by itself, within the deadline; its exit status.

        Also records its CPU time: what reaping it adds to this process's children's usage.
        """
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process = self.running[name]
        # Popen.wait(timeout) polls with sleeps of up to 50 ms, which would add to the measured
        # wall time; a pidfd becomes readable the moment the process exits.
        pidfd = os.pidfd_open(process.pid)
        try:
            exited, _, _ = select.select([pidfd], [], [], self.remaining())
        finally:
            os.close(pidfd)
        if not exited:
            raise Aborted(f"timed out waiting for {name}")
        code = process.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_secs[name] = (after.ru_utime + after.ru_stime) - (
            before.ru_utime + before.ru_stime
        )
        return code

    def record_cpu(self, name: str) -> None:
        """CPU time so far of a process that is still running (user + system)."""
        fields = Path(f"/proc/{self.running[name].pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat(5), in clock ticks.
        self.cpu_secs[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()


def free_port() -> int:
    """A port free right now (Flower's legacy server cannot report the one it bound to 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# The command line of the client process named ``name`` that runs clients ``first`` to
# ``first + count - 1``: (name, first, count) -> argv.
ClientArgv = Callable[[str, int, int], list[str]]


def start_clients(procs: Processes, w: Workload, prefix: str, argv: ClientArgv) -> list[str]:
    """Start the workload's client processes; their names."""
    groups = w.client_groups()
    names = [f"{prefix}-{k}" if len(groups) > 1 else prefix for k in range(len(groups))]
    for name, (first, count) in zip(names, groups, strict=True):
        procs.start(name, argv(name, first, count))
    return names


def wait_clients(procs: Processes, names: list[str], what: str) -> None:
    for name in names:
        if procs.wait(name) != 0:
            raise Aborted(f"{what} failed; see {procs.log_dir / name}.log")


def clients_importing(
    w: Workload, run_dir: Path, deadline: float, prefix: str, argv: ClientArgv
) -> dict[str, Any]:
    """The same client processes started the same way, each exiting as soon as its script's
    imports are done (``--import-only``): what importing alone takes them, wall and CPU."""
    run_dir.mkdir()
    procs = Processes(run_dir, deadline)
    try:
        t0 = time.monotonic()
        names = start_clients(procs, w, prefix, lambda *a: [*argv(*a), "--import-only"])
        wait_clients(procs, names, "importing clients")
        wall = time.monotonic() - t0
    finally:
        procs.stop_all()
    return {"wall_secs": wall, "cpu_secs": sum(procs.cpu_secs.values())}


def check_range(low: float, high: float, expected: float, rounds: int) -> dict[str, Any]:
    error = max(high - expected, expected - low)
    return {
        "expected": expected,
        "min": low,
        "max": high,
        "max_abs_error": error,
        "ok": error <= workload.tolerance(expected, rounds),
    }


def cpu_by_role(result: dict[str, Any]) -> dict[str, float]:
    """CPU seconds per kind of process: the client processes ("participants-3", ...) summed."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, secs in result["cpu_secs"].items():
        role = re.sub(r"-\d+$", "", name)
        totals[role] = totals.get(role, 0.0) + secs
        counts[role] = counts.get(role, 0) + 1
    return {
        (f"{role} ({counts[role]} processes)" if counts[role] > 1 else role): secs
        for role, secs in totals.items()
    }


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- Rondo -----------------------------------------------------------------------------------


def log_time(line: str) -> float | None:
    """Unix time of a tracing log line (it starts with an RFC 3339 UTC timestamp)."""
    try:
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    except (IndexError, ValueError):
        return None


def round_log(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Unix times at which the coordinator logged each round open and closed (first attempt)."""
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    for line in (run_dir / "coordinator.log").read_text(errors="replace").splitlines():
        for marker, table in (("round open", opened), ("round closed", closed)):
            if marker in line and "round=" in line and (at := log_time(line)) is not None:
                number = line.split("round=", 1)[1].split()[0]
                if number.isdigit():
                    table.setdefault(int(number), at)
    return opened, closed


def rondo_phases(
    opened: dict[int, float], closed: dict[int, float], events: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per training round, where the time went, from the coordinator's log and client events.

    Phases (seconds, from the coordinator's "round open" line): until the first and the last
    participant had its model downloaded and decoded (this includes the heartbeat that tells it
    it is selected), until the last upload finished, and until the coordinator logged the round
    closed (the aggregator's finalisation and its report to the coordinator).
    """
    phases = []
    for r in sorted(opened):
        mine = [e for e in events if e["round"] == r]
        starts = [e["at"] for e in mine if e["what"] == "train_start"]
        uploads = [e["at"] for e in mine if e["what"] == "uploaded"]
        if not starts or not uploads:
            continue
        t0 = opened[r]
        phases.append(
            {
                "round": r,
                "first_model_in_secs": min(starts) - t0,
                "last_model_in_secs": max(starts) - t0,
                "last_upload_done_secs": max(uploads) - t0,
                "closed_secs": closed[r] - t0 if r in closed else None,
            }
        )
    return phases


def edges(
    t0_unix: float, first_open: float | None, last_close: float | None, end_unix: float
) -> dict[str, float | None]:
    """Wall time before the first round opened and after the last one closed."""
    return {
        "before_first_round_secs": None if first_open is None else first_open - t0_unix,
        "after_last_round_secs": None if last_close is None else end_unix - last_close,
    }


def run_rondo(
    w: Workload, run_dir: Path, deadline: float, services_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One Rondo run of `w`; `services_env` adds settings to both services' environment (e.g.
    a `[store]`, for bench/durable_acks.py)."""
    # The initial model is written before the clock starts: Rondo then runs exactly R rounds
    # from the same zero model that Flower gets as initial_parameters.
    initial = run_dir / "initial.safetensors"
    safetensors.numpy.save_file(workload.zero_model(w.n_elements), str(initial))
    heartbeat_period = 0.05 if w.clients <= 10 else 0.2
    heartbeat_timeout = 10.0 if w.clients <= 10 else 30.0
    if w.size > 200 * MB:
        heartbeat_timeout = 60.0  # a participant busy with a GB-sized model answers late
    # Ports chosen up front, as for Flower, so that all three processes start at once, as an
    # operator would start them: the coordinator keeps trying to reach the aggregator, and the
    # participants to join the coordinator, until each is up.
    aggregator_rpc = f"127.0.0.1:{free_port()}"
    coordinator_url = f"http://127.0.0.1:{free_port()}"

    def participant_argv(name: str, first: int, count: int) -> list[str]:
        return [
            sys.executable,
            str(BENCH / "rondo_participants.py"),
            "--coordinator-url", coordinator_url,
            "--clients", str(count),
            "--first-index", str(first),
            "--n-elements", str(w.n_elements),
            "--heartbeat-period", str(heartbeat_period),
            "--events", str(run_dir / f"{name}-events.json"),
        ]  # fmt: skip

    procs = Processes(run_dir, deadline)
    try:
        t0, t0_unix = time.monotonic(), time.time()
        aggregator_pid = procs.start(
            "aggregator",
            [str(TARGET / "aggregator"), "-c", str(REPO / "configs" / "dev-aggregator.toml")],
            {
                "RONDO__API__PORT": str(free_port()),
                "RONDO__RPC__PORT": aggregator_rpc.rsplit(":", 1)[1],
                "RONDO__MODEL__INITIAL_MODEL": str(initial),
                **(services_env or {}),
            },
        )
        coordinator_pid = procs.start(
            "coordinator",
            [str(TARGET / "coordinator"), "-c", str(REPO / "configs" / "dev-coordinator.toml")],
            {
                "RONDO__API__PORT": coordinator_url.rsplit(":", 1)[1],
                "RONDO__RPC__PORT": str(free_port()),
                "RONDO__AGGREGATOR__RPC_ADDRESS": aggregator_rpc,
                "RONDO__FEDERATION__ROUNDS": str(w.rounds),
                "RONDO__FEDERATION__MIN_CLIENTS": str(w.clients),
                "RONDO__FEDERATION__HEARTBEAT_PERIOD_SECS": str(heartbeat_period),
                "RONDO__FEDERATION__HEARTBEAT_TIMEOUT_SECS": str(heartbeat_timeout),
                # Never close a round early: the check expects every client in every round.
                "RONDO__FEDERATION__ROUND_TIMEOUT_SECS": str(max(1.0, procs.remaining())),
                **(services_env or {}),
            },
        )
        names = start_clients(procs, w, "participants", participant_argv)
        wait_clients(procs, names, "participants")
        wall, end_unix = time.monotonic() - t0, time.time()
        # The final model was aggregated before the last participant was told "finish".

        for name in ("aggregator", "coordinator"):
            procs.check_alive(name)
        # Peaks first: fetching the model below must not count.
        aggregator_peak = workload.peak_rss_bytes(aggregator_pid)
        coordinator_peak = workload.peak_rss_bytes(coordinator_pid)
        procs.record_cpu("aggregator")
        procs.record_cpu("coordinator")
        status = requests.get(f"{coordinator_url}/v1/status", timeout=30).json()
        history = sorted(status["history"], key=lambda e: (e["round"], e.get("attempt", 0)))
        aggregated = [e for e in history if e.get("outcome") == "aggregated" and e["round"] >= 1]
        incomplete = [e["round"] for e in aggregated if len(e["delivered"]) != w.clients]

        response = requests.get(f"{status['aggregator_url'].rstrip('/')}/v1/model", timeout=600)
        response.raise_for_status()
        model, metadata = decode(response.content)
        del response
        check = check_range(
            *workload.value_range(model), workload.expected_value(w.clients, w.rounds), w.rounds
        )
        shapes = {name: list(a.shape) for name, a in model.items()}
        wanted = {name: [n] for name, n in workload.dummy().layout(w.n_elements).items()}
        check["ok"] = check["ok"] and shapes == wanted and not incomplete
        check["model_round"] = metadata.get("rondo.round")
        del model
        events = [e for n in names for e in json.loads((run_dir / f"{n}-events.json").read_text())]
        opened, closed = round_log(run_dir)
    finally:
        procs.stop_all()
    importing = clients_importing(
        w, run_dir / "imports", deadline, "participants", participant_argv
    )
    return {
        "wall_secs": wall,
        "clients_importing": importing,
        "round_secs": [e["duration_secs"] for e in aggregated],
        "rounds_aggregated": len(aggregated),
        "rounds_missing_clients": incomplete,
        "other_outcomes": [
            {"round": e["round"], "outcome": e.get("outcome"), "reason": e.get("reason")}
            for e in history
            if e.get("outcome") != "aggregated"
        ],
        "server_peak_bytes": aggregator_peak + coordinator_peak,
        "aggregator_peak_bytes": aggregator_peak,
        "coordinator_peak_bytes": coordinator_peak,
        "heartbeat_period_secs": heartbeat_period,
        "cpu_secs": procs.cpu_secs,
        "phases": rondo_phases(opened, closed, events),
        **edges(t0_unix, opened.get(1), closed.get(w.rounds), end_unix),
        "check": check,
    }


# --- Flower ----------------------------------------------------------------------------------


def run_flower(w: Workload, run_dir: Path, deadline: float) -> dict[str, Any]:
    address = f"127.0.0.1:{free_port()}"
    common = ["--address", address, "--n-elements", str(w.n_elements)]
    common += ["--max-message", str(GRPC_MAX_MESSAGE)]
    report_path = run_dir / "flower-server.json"

    def client_argv(name: str, first: int, count: int) -> list[str]:
        return [sys.executable, str(BENCH / "flower_clients.py"), *common] + [
            "--clients", str(count), "--first-index", str(first)
        ]  # fmt: skip

    procs = Processes(run_dir, deadline)
    try:
        t0, t0_unix = time.monotonic(), time.time()
        procs.start(
            "flower-server",
            [sys.executable, str(BENCH / "flower_server.py"), *common]
            + ["--clients", str(w.clients), "--rounds", str(w.rounds), "--out", str(report_path)],
        )
        # Flower's clients retry until the server listens, so both start at once, as an
        # operator would start them.
        names = start_clients(procs, w, "flower-clients", client_argv)
        # The server writes its report (peak RSS, final model) and exits after the last round
        # and after telling the clients to disconnect.
        if procs.wait("flower-server") != 0:
            raise Aborted(f"Flower server failed; see {run_dir / 'flower-server.log'}")
        wait_clients(procs, names, "Flower clients")
        wall, end_unix = time.monotonic() - t0, time.time()
    finally:
        procs.stop_all()
    importing = clients_importing(w, run_dir / "imports", deadline, "flower-clients", client_argv)
    report = json.loads(report_path.read_text())
    expected = workload.expected_value(w.clients, w.rounds)
    if "final_range" in report:
        check = check_range(*report["final_range"], expected, w.rounds)
        wanted = [[n] for n in workload.dummy().layout(w.n_elements).values()]
        check["ok"] = check["ok"] and report["final_shapes"] == wanted
    else:
        check = {"expected": expected, "ok": False, "error": "no final model"}
    rounds = report["rounds"]
    incomplete = [r["round"] for r in rounds if r["delivered"] != w.clients]
    check["ok"] = check["ok"] and len(rounds) == w.rounds and not incomplete
    first_open = rounds[0]["started_unix"] if rounds else None
    last_close = rounds[-1]["ended_unix"] if rounds else None
    return {
        "wall_secs": wall,
        "clients_importing": importing,
        **edges(t0_unix, first_open, last_close, end_unix),
        "round_secs": [r["duration_secs"] for r in rounds],
        "rounds_aggregated": len(rounds),
        "rounds_missing_clients": incomplete,
        "server_peak_bytes": report["peak_rss_bytes"],
        "cpu_secs": procs.cpu_secs,
        "check": check,
    }


# --- reporting -------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> None:
    result["round_mean_secs"] = mean(result["round_secs"])
    # Start-up (processes, imports, joining), gaps between rounds and shutdown.
    result["outside_rounds_secs"] = result["wall_secs"] - sum(result["round_secs"])
    # What the federation adds to its client processes merely starting (and exiting).
    result["importing_alone_secs"] = result["clients_importing"]["wall_secs"]
    result["beyond_importing_secs"] = result["wall_secs"] - result["importing_alone_secs"]


def ratio(flower: float | None, rondo: float | None) -> float | None:
    return flower / rondo if flower is not None and rondo else None


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def memory_check(w: Workload, rondo: dict[str, Any]) -> dict[str, Any]:
    limit = 3 * w.size + 64 * MB
    peak = rondo["aggregator_peak_bytes"]
    return {"aggregator_peak_bytes": peak, "limit_bytes": limit, "ok": peak <= limit}


def table(entry: dict[str, Any]) -> str:
    """The per-workload console table."""
    rondo, flower = entry.get("rondo"), entry.get("flower")
    lines = [f"== {entry['workload']['name']} =="]
    if rondo is None or "error" in rondo:
        lines.append(f"Rondo: {'aborted: ' + rondo['error'] if rondo else 'not run'}")
    if flower is None or "error" in flower or "skipped" in flower:
        why = (
            "not run" if flower is None else flower.get("skipped") or "aborted: " + flower["error"]
        )
        lines.append(f"Flower: {why}")
    ok_rondo = rondo if rondo and "error" not in rondo else None
    ok_flower = flower if flower and "wall_secs" in flower else None

    def row(label: str, key: str, scale: float = 1.0, digits: int = 2) -> str:
        a = ok_rondo[key] / scale if ok_rondo and ok_rondo[key] is not None else None
        b = ok_flower[key] / scale if ok_flower and ok_flower[key] is not None else None
        return (
            f"{label:<24}{fmt(a, digits):>12}{fmt(b, digits):>12}"
            f"{fmt(ratio(b, a), 1, 'x') if ok_flower else '-':>16}"
        )

    if ok_rondo or ok_flower:
        repeat = entry["workload"]["repeat"]
        if repeat > 1:
            lines.append(f"(the run of median wall time of {repeat} runs of each system)")
        lines.append(f"{'':<24}{'Rondo':>12}{'Flower':>12}{'Flower/Rondo':>16}")
        lines.append(row("wall time (s)", "wall_secs"))
        lines.append(row("round time, mean (s)", "round_mean_secs", digits=3))
        lines.append(row("wall outside rounds (s)", "outside_rounds_secs"))
        lines.append(row("  before round 1 (s)", "before_first_round_secs"))
        lines.append(row("  after last round (s)", "after_last_round_secs"))
        lines.append(row("clients importing alone", "importing_alone_secs"))
        lines.append(row("wall beyond that (s)", "beyond_importing_secs"))
        lines.append(row("server peak RSS (MB)", "server_peak_bytes", MB, 0))
        if ok_rondo:
            lines.append(
                f"{'  aggregator alone (MB)':<24}{ok_rondo['aggregator_peak_bytes'] / MB:>12.0f}"
            )
            lines.append(
                f"{'  coordinator (MB)':<24}{ok_rondo['coordinator_peak_bytes'] / MB:>12.0f}"
            )

        def verdict(r: dict[str, Any] | None) -> str:
            return "-" if r is None else ("yes" if r["check"]["ok"] else "NO")

        lines.append(f"{'final model correct':<24}{verdict(ok_rondo):>12}{verdict(ok_flower):>12}")
    for label, result in (("Rondo", ok_rondo), ("Flower", ok_flower)):
        if result and len(result.get("wall_secs_runs", [])) > 1:
            walls = ", ".join(f"{secs:.2f}" for secs in result["wall_secs_runs"])
            lines.append(f"{label} wall times of every run (s): {walls}")
    for label, result in (("Rondo", ok_rondo), ("Flower", ok_flower)):
        if result:
            cpu = ", ".join(f"{name} {secs:.1f}" for name, secs in cpu_by_role(result).items())
            alone = result["clients_importing"]["cpu_secs"]
            lines.append(f"{label} CPU s: {cpu} (clients importing alone: {alone:.1f})")
    if ok_rondo:
        mem = entry["memory_check"]
        lines.append(
            f"check: Rondo aggregator peak {mem['aggregator_peak_bytes'] / MB:.0f} MB <= "
            f"3 x model + 64 MB = {mem['limit_bytes'] / MB:.0f} MB: "
            f"{'OK' if mem['ok'] else 'FAILED'}"
        )
        phases = ok_rondo["phases"]
        if phases:
            parts = []
            for label, key in (
                ("first model in", "first_model_in_secs"),
                ("last model in", "last_model_in_secs"),
                ("last upload done", "last_upload_done_secs"),
                ("round closed", "closed_secs"),
            ):
                parts.append(
                    f"{label} {fmt(mean([p[key] for p in phases if p[key] is not None]), 3)}"
                )
            lines.append("Rondo rounds, mean s after opening: " + ", ".join(parts))
    return "\n".join(lines)


def scaled(result: dict[str, Any], key: str, scale: float) -> float | None:
    """A measured value of a run that completed, else None."""
    if "wall_secs" not in result or result.get(key) is None:
        return None
    return float(result[key]) / scale


def markdown(entries: list[dict[str, Any]]) -> str:
    """One Markdown table over every workload, for docs/benchmarks.md."""
    lines = [
        "| Workload | Rondo wall s | Flower wall s | Flower/Rondo | Rondo round s | "
        "Flower round s | Flower/Rondo | Rondo server peak MB (aggregator) | "
        "Flower server peak MB | Flower/Rondo | Final model correct (Rondo / Flower) |",
        "|" + "---|" * 11,
    ]
    for entry in entries:
        rondo = entry.get("rondo") or {}
        flower = entry.get("flower") or {}
        r_ok, f_ok = "wall_secs" in rondo, "wall_secs" in flower

        cells = [entry["workload"]["name"]]
        for key, scale, digits in (
            ("wall_secs", 1.0, 2),
            ("round_mean_secs", 1.0, 3),
            ("server_peak_bytes", MB, 0),
        ):
            a, b = scaled(rondo, key, scale), scaled(flower, key, scale)
            first = fmt(a, digits)
            if key == "server_peak_bytes" and r_ok:
                first += f" ({rondo['aggregator_peak_bytes'] / MB:.0f})"
            second = fmt(b, digits)
            if not f_ok and key == "wall_secs":
                # Say why Flower has no numbers, once per row.
                second = flower.get("skipped") or (
                    f"aborted: {flower['error']}" if "error" in flower else "not run"
                )
            cells += [first, second, fmt(ratio(b, a), 1, "×")]
        cells.append(
            " / ".join(
                ("yes" if result["check"]["ok"] else "NO") if ok else "-"
                for result, ok in ((rondo, r_ok), (flower, f_ok))
            )
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def run_one(
    label: str,
    runner: Any,
    w: Workload,
    run_dir: Path,
    deadline: float,
) -> dict[str, Any]:
    """Run one system on one workload; an abort becomes {"error": ...} rather than an exit."""
    run_dir.mkdir(parents=True)
    print(f"-- {w.name}: {label} (logs in {run_dir})", flush=True)
    try:
        result: dict[str, Any] = runner(w, run_dir, deadline)
    except (Aborted, requests.RequestException, OSError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "logs": str(run_dir)}
    finally:
        for leftover in run_dir.glob("*.safetensors"):
            leftover.unlink()  # a 1 GB initial model is not worth keeping with the logs
    summarize(result)
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time stands for all (the lower one of an even count), with every
    run's wall time beside it; peak memory is the highest of any run, and the final model
    counts as correct only when it was in every run. A failed run makes the whole a failure."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {**failed[0], "runs": len(runs), "failed_runs": len(failed)}
    by_wall = sorted(runs, key=lambda r: r["wall_secs"])
    chosen = dict(by_wall[(len(by_wall) - 1) // 2])
    chosen["wall_secs_runs"] = [r["wall_secs"] for r in runs]
    for key in ("server_peak_bytes", "aggregator_peak_bytes", "coordinator_peak_bytes"):
        if key in chosen:
            chosen[key] = max(r[key] for r in runs)
    chosen["check"] = {**chosen["check"], "ok": all(r["check"]["ok"] for r in runs)}
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workload", type=parse_workload, action="append", metavar="N,SIZE,R",
        help=f"clients, model size, rounds; repeatable (default: {' '.join(DEFAULT_WORKLOADS)})",
    )  # fmt: skip
    parser.add_argument("--rondo-only", action="store_true", help="do not run Flower")
    parser.add_argument(
        "--client-processes", type=int, default=0, metavar="P",
        help="spread each system's clients over P processes, as threads within each "
        "(default: 0, a process of its own for every client, as in a federation; 1 runs "
        "all clients as threads of one process)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=3, metavar="N",
        help="run each system N times per workload, alternating, and report the run of median "
        "wall time (default: 3; this machine's timings vary by tens of percent)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-flower-above", type=parse_size, default=parse_size("200MB"), metavar="SIZE",
        help="run Flower only for models up to this size (default: 200MB)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=900.0, metavar="SECS",
        help="abort one run of one system after this long (default: 900)",
    )  # fmt: skip
    parser.add_argument("--json-out", type=Path, metavar="PATH")
    parser.add_argument("--markdown-out", type=Path, metavar="PATH")
    parser.add_argument(
        "--keep-logs", action="store_true",
        help="keep the logs directory even when every run succeeded",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.client_processes < 0:
        parser.error("--client-processes must be 0 (one per client) or more")
    if not args.workload:
        args.workload = [parse_workload(text) for text in DEFAULT_WORKLOADS]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for binary in ("coordinator", "aggregator"):
        if not (TARGET / binary).exists():
            sys.exit(f"{TARGET / binary} is missing: run scripts/setup --release (or bench/run)")
    logs = Path(tempfile.mkdtemp(prefix="rondo-bench-"))
    entries: list[dict[str, Any]] = []
    failed = False
    for number, w in enumerate(args.workload):
        w = dataclasses.replace(w, client_processes=args.client_processes)
        entry: dict[str, Any] = {
            "workload": {"clients": w.clients, "size_bytes": w.size, "rounds": w.rounds}
            | {"name": w.name, "repeat": args.repeat, "client_processes": len(w.client_groups())}
        }
        with_flower = not args.rondo_only and w.size <= args.skip_flower_above
        runs: dict[str, list[dict[str, Any]]] = {"rondo": [], "flower": []}
        # Alternating, so that a slow spell of the machine falls on both systems alike.
        systems = [("Rondo", run_rondo, "rondo")]
        if with_flower:
            systems.append(("Flower", run_flower, "flower"))
        for attempt in range(args.repeat):
            base = logs / f"{number}-{w.clients}x{w.label}x{w.rounds}" / f"run{attempt + 1}"
            for label, runner, key in systems:
                deadline = time.monotonic() + args.timeout
                runs[key].append(run_one(label, runner, w, base / key, deadline))
        entry["rondo"] = median_run(runs["rondo"])
        entry["rondo_runs"] = runs["rondo"]
        if "error" not in entry["rondo"]:
            entry["memory_check"] = memory_check(w, entry["rondo"])
        if args.rondo_only:
            entry["flower"] = None
        elif not with_flower:
            entry["flower"] = {"skipped": FLOWER_TOO_LARGE}
        else:
            entry["flower"] = median_run(runs["flower"])
            entry["flower_runs"] = runs["flower"]
        for result in (entry["rondo"], entry["flower"]):
            if result and ("error" in result or ("check" in result and not result["check"]["ok"])):
                failed = True
        if entry.get("memory_check", {}).get("ok") is False:
            failed = True
        entries.append(entry)
        print(table(entry) + "\n", flush=True)

    document = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "flower_version": flower_version(),
        "workloads": entries,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(document, indent=2) + "\n")
    md = markdown(entries)
    if args.markdown_out:
        args.markdown_out.write_text(md)
    print(md)
    if failed or args.keep_logs:
        print(f"logs kept in {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


def flower_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001 - only informational
        return None


if __name__ == "__main__":
    sys.exit(main())
