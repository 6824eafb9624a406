#!/usr/bin/env python3
"""The close of a round under the Python weighted average against native fedavg.

Runs bench/close_latency.py's measurement twice on the release binaries, in one run: the same
model (SIZE bytes of float32), two participants, R rounds; once with `strategy = "fedavg"`,
once with `strategy = "python"` and `rondo_aggregators.weighted_average.WeightedAverage`
(from this venv). The close latency is the time from the last byte of a round's last upload to
the new model being downloadable: for the Python path that is its `add_update` of that upload
(float64 sums in numpy), `finish_round` (divide, cast) and the check and copy of the result
into the model file. The status is polled every --poll-ms (1 ms): close_latency.py's tight
loop would keep one of a small machine's cores from the aggregator. Prints a markdown table.

    scripts/setup --release
    .venv/bin/python bench/python_vs_native.py --model-size 100MB --rounds 5 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys

from close_latency import measure

from rondo.util import parse_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="100MB", type=parse_size)
    parser.add_argument("--rounds", default=5, type=int)
    parser.add_argument(
        "--repeat",
        default=3,
        type=int,
        help="runs of each, alternating (the machine's load drifts: medians over all rounds)",
    )
    parser.add_argument(
        "--poll-ms",
        default=1.0,
        type=float,
        help="how often the new model is looked for (0: a tight loop, which takes a core from "
        "the aggregator on a small machine; 1 ms costs at most that much resolution)",
    )
    args = parser.parse_args()
    runs = {
        "native `fedavg`": {"RONDO__AGGREGATION__STRATEGY": "fedavg"},
        "Python `WeightedAverage`": {
            "RONDO__AGGREGATION__STRATEGY": "python",
            "RONDO__AGGREGATION__PYTHON__MODULE": "rondo_aggregators.weighted_average",
            "RONDO__AGGREGATION__PYTHON__CLASS": "WeightedAverage",
            "RONDO__AGGREGATION__PYTHON__VENV": sys.prefix,
        },
    }
    results: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in runs}
    for repeat in range(args.repeat):
        for name, env in runs.items():
            print(f"--- {name}, run {repeat + 1} of {args.repeat}")
            latencies, peak_mb = measure(
                args.model_size, args.rounds, env, poll_interval=args.poll_ms / 1e3
            )
            results[name] = (results[name][0] + latencies, max(results[name][1], peak_mb))
    native = statistics.median(results["native `fedavg`"][0])
    command = " ".join(["bench/python_vs_native.py", *sys.argv[1:]])
    print(
        f"\n`{command}` (model {args.model_size / 1e6:.0f} MB float32, 2 participants, "
        f"{args.repeat} × {args.rounds} rounds each, alternating)\n"
    )
    print("| aggregation | close, median of rounds (ms) | max (ms) | vs native | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, (latencies, peak_mb) in results.items():
        median = statistics.median(latencies)
        print(
            f"| {name} | {median:.1f} | {max(latencies):.1f} | {median / native:.2f}× | "
            f"{peak_mb:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
