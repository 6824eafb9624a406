#!/usr/bin/env python3
"""Rondo's native robust aggregation rules against Flower's, on the same updates.

For each N of ``--ns`` (10 and 50) it writes N seeded random float32 updates of ``--mb`` MB
(10) once, as raw little-endian files, then for each rule runs, each in a process of its own:
Rondo's ``robust_rule`` example (release build; the median of three finalizes) and Flower
1.41's function from ``flwr.server.strategy.aggregate`` on the same files (the median of
``--flower-repeats`` calls, 3 by default). Each process reports its time and its own peak RSS
(VmHWM, MiB), which includes the N updates it holds; the results are compared where the two
definitions agree. Prints a markdown table, then how the definitions differ.

    bench/.venv/bin/python bench/robust_vs_flower.py                 # N = 10, 50 at 10 MB
    bench/.venv/bin/python bench/robust_vs_flower.py --ns 5 --mb 1   # a quick check

Parameters: ``f = max(1, N // 10)`` for the Krum family (Bulyan needs N >= 4f + 3), trimmed
``beta = 0.1`` from each end, Multi-Krum ``m = N - f`` (Rondo's default; Flower needs it given).
Flower's Bulyan repeats a whole Krum (distances included) for each of its N - 2f selections:
at N = 50, 10 MB expect it to take minutes per call.

Times drift with machine load; compare through the ratios of one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Neither side uses BLAS, but numpy's OpenBLAS starts a spinning thread per core at import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402 - after the environment above

REPO = Path(__file__).resolve().parent.parent
RULES = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")
BETA = 0.1

# Where Flower's definition differs from Rondo's, and what that means for this comparison.
DIFFERENCES = {
    "median": "same definition (np.median: the mean of the two middle values for even N); "
    "Flower computes in float32, Rondo in float64 rounded once to float32",
    "trimmed_mean": "same count: Flower cuts int(beta * N) from each end, Rondo floor(beta * N); "
    "Flower averages in float32 (pairwise), Rondo in float64",
    "krum": "same score on the n - f - 2 nearest; Flower clamps that count to at least 1 and "
    "runs any N, Rondo refuses N <= 2f + 2; ties: Flower's first in list order, Rondo's "
    "lowest key (here the same: keys sort in file order); Flower's distances are float32 "
    "norms squared, Rondo's float64 sums",
    "multi_krum": "Flower averages the m chosen weighted by their sample counts, Rondo "
    "unweighted: they agree here only because every update reports the same count; "
    "Flower needs m (to_keep) given, Rondo defaults to N - f",
    "bulyan": "same selection (Krum on the remaining set, its neighbour count clamped to at "
    "least 1, which Rondo does too) and the same beta = N - 4f closest to the median; "
    "Flower recomputes all distances for each selection, Rondo reuses one matrix; on an "
    "exact tie in distance to the median Flower's argpartition takes either, Rondo the lower",
}


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flower_worker(args: argparse.Namespace) -> None:
    """One rule through Flower in this process: prints {"secs", "peak_rss_mb", "loaded_mb"}."""
    from flwr.server.strategy.aggregate import (
        aggregate_bulyan,
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

    directory = Path(args.dir)
    arrays = [np.fromfile(directory / f"u{k}.f32", dtype="<f4") for k in range(args.n)]
    # Every update reports the same sample count: Multi-Krum's weighted mean is then the mean.
    results = [([a], 1) for a in arrays]
    rules = {
        "median": lambda r: aggregate_median(r),
        "trimmed_mean": lambda r: aggregate_trimmed_avg(r, proportiontocut=args.beta),
        "krum": lambda r: aggregate_krum(r, num_malicious=args.f, to_keep=0),
        "multi_krum": lambda r: aggregate_krum(r, num_malicious=args.f, to_keep=args.m),
        "bulyan": lambda r: aggregate_bulyan(
            r, num_malicious=args.f, aggregation_rule=aggregate_krum, to_keep=0
        ),
    }
    function = rules[args.rule]
    loaded = status_mib("VmRSS")
    times = []
    out = None
    for _ in range(args.repeats):
        out = None
        start = time.perf_counter()
        out = function(list(results))  # a fresh list: Bulyan pops from the one it is given
        times.append(time.perf_counter() - start)
    assert out is not None
    np.asarray(out[0], dtype="<f4").tofile(args.out)
    print(
        json.dumps(
            {
                "secs": statistics.median(times),
                "peak_rss_mb": status_mib("VmHWM"),
                "loaded_mb": loaded,
            }
        )
    )


def run_json(command: list[str], timeout: float | None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_updates(directory: Path, n: int, mb: float, seed: int) -> None:
    values = round(mb * 1e6 / 4)
    rng = np.random.default_rng(seed)
    for k in range(n):
        rng.standard_normal(values, dtype=np.float32).astype("<f4").tofile(directory / f"u{k}.f32")


def compare(rule: str, rondo: np.ndarray, flower: np.ndarray) -> tuple[str, float]:
    if rondo.shape != flower.shape:
        return "no (shapes differ)", float("nan")
    diff = float(np.max(np.abs(rondo.astype(np.float64) - flower))) if rondo.size else 0.0
    if rule == "krum":
        return ("yes (identical)" if np.array_equal(rondo, flower) else "no"), diff
    # float32 results computed in different precisions and orders.
    close = np.allclose(rondo, flower, rtol=1e-5, atol=1e-6)
    return ("yes" if close else "no"), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="10,50", help="update counts, comma-separated")
    parser.add_argument("--mb", type=float, default=10.0, help="model size in MB (1e6 bytes)")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--flower-repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--workdir", default=None, help="where updates go (default: a temp dir)")
    parser.add_argument("--no-build", action="store_true", help="use the built example as is")
    parser.add_argument("--flower-worker", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.flower_worker:
        rule, directory, n, f, m, out, repeats = args.flower_worker
        flower_worker(
            argparse.Namespace(
                rule=rule,
                dir=directory,
                n=int(n),
                f=int(f),
                m=int(m),
                beta=BETA,
                out=out,
                repeats=int(repeats),
            )
        )
        return

    rules = [r for r in args.rules.split(",") if r]
    unknown = set(rules) - set(RULES)
    if unknown:
        parser.error(f"unknown rules: {', '.join(sorted(unknown))}")
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "release" / "examples" / "robust_rule"
    if not args.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "rondo-core", "--example", "robust_rule"],
            cwd=REPO,
            check=True,
        )

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="robust-"))
    rows = []
    loaded = []
    try:
        for n in [int(v) for v in args.ns.split(",") if v]:
            f = max(1, n // 10)
            m = n - f
            directory = workdir / f"n{n}"
            directory.mkdir(parents=True, exist_ok=True)
            write_updates(directory, n, args.mb, args.seed)
            for rule in rules:
                need = {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3}
                if n < need.get(rule, 1):
                    rows.append((rule, n, f, None, None, f"needs N >= {need[rule]}", 0.0))
                    continue
                rondo_out = directory / f"rondo_{rule}.f32"
                flower_out = directory / f"flower_{rule}.f32"
                command = [str(binary), "--rule", rule, "--n", str(n)]
                command += ["--read-updates", str(directory), "--write-result", str(rondo_out)]
                if rule == "trimmed_mean":
                    command += ["--beta", str(BETA)]
                if rule in ("krum", "multi_krum", "bulyan"):
                    command += ["--f", str(f)]
                if rule == "multi_krum":
                    command += ["--m", str(m)]
                rondo = run_json(command, args.timeout)
                flower = run_json(
                    [sys.executable, __file__, "--flower-worker", rule, str(directory)]
                    + [str(n), str(f), str(m), str(flower_out), str(args.flower_repeats)],
                    args.timeout,
                )
                agree, diff = compare(
                    rule, np.fromfile(rondo_out, dtype="<f4"), np.fromfile(flower_out, "<f4")
                )
                loaded.append(flower["loaded_mb"])
                rows.append((rule, n, f, rondo, flower, agree, diff))
                for path in (rondo_out, flower_out):
                    path.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.mb:g} MB float32 models, {os.cpu_count()} CPUs\n")
    print(
        "| rule | N | Rondo s | Flower s | Flower/Rondo | Rondo peak MB | Flower peak MB "
        "| ratio | results agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rule, n, f, rondo, flower, agree, diff in rows:
        label = rule if rule in ("median", "trimmed_mean") else f"{rule} (f = {f})"
        if rondo is None or flower is None:
            print(f"| {label} | {n} | | | | | | | {agree}: not run |")
            continue
        print(
            f"| {label} | {n} | {rondo['secs']:.3f} | {flower['secs']:.3f} "
            f"| {flower['secs'] / rondo['secs']:.1f}x | {rondo['peak_rss_mb']:.0f} "
            f"| {flower['peak_rss_mb']:.0f} | {flower['peak_rss_mb'] / rondo['peak_rss_mb']:.1f}x "
            f"| {agree}{'' if agree.startswith('yes (identical') else f' (max diff {diff:.1e})'} |"
        )
    print(
        "\nPeak MB is each process's VmHWM in MiB: the N updates it holds and its working set; "
        "Flower's also includes Python, numpy and Flower's imports"
        + (
            f" (its RSS with the updates loaded, before aggregating: {min(loaded):.0f} to "
            f"{max(loaded):.0f} MiB)"
            if loaded
            else ""
        )
        + f". Trimmed beta = {BETA}, Multi-Krum m = N - f.\n"
    )
    for rule in rules:
        print(f"- {rule}: {DIFFERENCES[rule]}.")


if __name__ == "__main__":
    main()
