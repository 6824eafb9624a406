"""``house-prices-report``: follow a federation to its end, then score what it trained.

1. Shows a progress bar over the federation's rounds, polling the coordinator's
   ``GET /v1/status``, until the coordinator says it is finished.
2. Prints, per round, the sample-weighted means of what the participants reported with their
   updates (training loss, validation loss and RMSLE on their own validation slices, before and
   after local training), weighted by ``n_samples`` as FedAvg weights the updates.
3. Downloads the final global model from the aggregator (``GET /v1/model``), loads it into the
   Keras model and evaluates it on the held-out test set with Keras itself: the federated test
   RMSLE (RMSE of log prices).
4. Trains the same model centrally on the union of the shards' training rows, for the same
   total number of epochs (rounds x local epochs), and scores it on the same test set.
5. Writes a PNG plot of the losses per round and a JSON file of every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import data
from .cli import positive_float, positive_int, run_command
from .participant import DEFAULT_EPOCHS

POLL_SECS = 0.5
PER_ROUND = ("loss", "val_loss", "val_rmsle", "global_val_loss", "global_val_rmsle")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="house-prices-report",
        description="Follow a house-prices federation to its end; print per-round losses and "
        "the final test RMSLE beside a centrally trained model's; plot the losses.",
    )
    parser.add_argument("--data-directory", type=Path, default=Path("data"), metavar="DIR")
    parser.add_argument("--coordinator-url", default="http://127.0.0.1:8081", metavar="URL")
    parser.add_argument(
        "--aggregator-url", default=None, metavar="URL",
        help="where to download the final model (default: the one the coordinator names)",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="E",
        help="the participants' local epochs per round, for the central baseline's total "
        f"(default: {DEFAULT_EPOCHS})",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, default=Path("house_prices_loss.png"))
    parser.add_argument("--results", type=Path, default=None, help="write every figure as JSON")
    parser.add_argument(
        "--save-model", type=Path, default=None, metavar="PATH",
        help="save the final global model as a Keras file (e.g. final.keras)",
    )  # fmt: skip
    parser.add_argument(
        "--status-file", type=Path, default=None, metavar="PATH",
        help="write the coordinator's final status (with the round history) here, as JSON, "
        "as soon as the federation has finished",
    )  # fmt: skip
    parser.add_argument(
        "--central", action=argparse.BooleanOptionalAction, default=True,
        help="train the central baseline (default: yes)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=positive_float, default=3600.0, metavar="SECS",
        help="give up waiting for the federation after this long (default: 3600)",
    )  # fmt: skip
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bars (default: when stderr is a terminal)",
    )  # fmt: skip
    return parser.parse_args(argv)


# --- following the federation ----------------------------------------------------------------


def get_status(coordinator_url: str) -> dict[str, Any]:
    from rondo import HttpClient

    with HttpClient() as http:
        status: dict[str, Any] = http.call(
            "GET", f"{coordinator_url.rstrip('/')}/v1/status", timeout=10
        )
    return status


def aggregated_rounds(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The training rounds (>= 1) that closed with a new model, one record each (a round
    rerun after a failed attempt appears once, as its aggregated attempt)."""
    records = [
        r for r in status.get("history", []) if r.get("outcome") == "aggregated" and r["round"]
    ]
    return sorted(records, key=lambda r: r["round"])


def round_means(record: Mapping[str, Any]) -> dict[str, float]:
    """Sample-weighted means of the metrics the round's participants reported."""
    out: dict[str, float] = {"participants": float(len(record.get("deliveries", [])))}
    for key in PER_ROUND:
        pairs = [
            (float(d["n_samples"]), float(d["metrics"][key]))
            for d in record.get("deliveries", [])
            if key in d.get("metrics", {})
        ]
        total = sum(n for n, _ in pairs)
        if total > 0:
            out[key] = sum(n * v for n, v in pairs) / total
    return out


def follow(coordinator_url: str, timeout: float, progress: bool | None = None) -> dict[str, Any]:
    """Poll the status until the federation is finished; a tqdm bar over its rounds."""
    from tqdm.auto import tqdm

    from rondo import NetworkError

    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    unreachable_since: float | None = None
    disable = None if progress is None else not progress  # None: only on a terminal
    with tqdm(total=None, desc="federation", unit="round", disable=disable) as bar:
        while True:
            try:
                status = get_status(coordinator_url)
                unreachable_since = None
            except NetworkError:
                # The coordinator may be starting; give up only after a while of silence.
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > 30:
                    raise
                time.sleep(POLL_SECS)
                continue
            bar.total = int(status.get("rounds", 0))
            done = aggregated_rounds(status)
            if done:
                means = round_means(done[-1])
                if "val_loss" in means:
                    bar.set_postfix(val_loss=f"{means['val_loss']:.4f}", refresh=False)
            bar.update(len(done) - bar.n)
            if status.get("phase") == "finished":
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the federation did not finish within {timeout:g} s "
                    f"(phase {status.get('phase')}, round {status.get('round')})"
                )
            time.sleep(POLL_SECS)


# --- scoring ---------------------------------------------------------------------------------


def score(
    data_dir: Path,
    status: Mapping[str, Any],
    aggregator_url: str | None,
    epochs: int,
    central: bool = True,
    save_model: Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Every figure of the report, as a dict (see the module docstring)."""
    import rondo.keras
    import rondo.models

    from . import model as keras_model

    spec = data.read_spec(data_dir)
    info = data.read_split_info(data_dir)
    test = data.read_rows(data_dir / data.TEST_FILE)
    x_test, y_test = data.features(test, spec), data.log_prices(test)
    rounds = aggregated_rounds(status)
    url = aggregator_url or status.get("aggregator_url")
    if not url:
        raise data.DataError("the coordinator does not name its aggregator; pass --aggregator-url")
    final = rondo.models.fetch_model(url)
    hp = keras_model.Hyperparameters()
    federated = keras_model.build_model(spec, hp)
    rondo.keras.set_weights(federated, final.weights)
    if save_model is not None:
        save_model.parent.mkdir(parents=True, exist_ok=True)
        federated.save(save_model)
    results: dict[str, Any] = {
        "split": info.get("split"),
        "seed": info.get("seed"),
        "participants": info.get("number_of_participants"),
        "local_epochs": epochs,
        "rounds": [{"round": r["round"], **round_means(r)} for r in rounds],
        "final_model_round": final.round,
        "federated_test_rmsle": keras_model.evaluate(federated, x_test, y_test)["rmse"],
        # Predicting the training rows' mean log price for every house: the bar to clear.
        "mean_predictor_test_rmsle": float(
            np.sqrt(np.mean((y_test - spec["target"]["mean"]) ** 2))
        ),
        "test_rows": len(test),
    }
    if central:
        shards = [data.read_shard(data_dir, k) for k in range(len(info.get("shards", [])))]
        train = [row for rows, _ in shards for row in rows]
        total_epochs = max(1, len(rounds)) * epochs
        baseline = keras_model.build_model(spec, hp)
        keras_model.fit(
            baseline,
            data.features(train, spec),
            data.log_prices(train),
            total_epochs,
            hp.batch_size,
            "central baseline",
            progress,
        )
        results["central_epochs"] = total_epochs
        results["central_test_rmsle"] = keras_model.evaluate(baseline, x_test, y_test)["rmse"]
    return results


def print_report(results: Mapping[str, Any]) -> None:
    print()
    print("round  updates  train loss  val loss  val RMSLE  global-model val RMSLE")
    for r in results["rounds"]:
        cells = [f"{r['round']:>5}", f"{int(r['participants']):>7}"]
        for key, width in (("loss", 10), ("val_loss", 8), ("val_rmsle", 9)):
            cells.append(f"{r[key]:>{width}.4f}" if key in r else " " * (width - 1) + "-")
        if "global_val_rmsle" in r:
            cells.append(f"{r['global_val_rmsle']:>22.4f}")
        print("  ".join(cells))
    print()
    fed = results["federated_test_rmsle"]
    print(
        f"test RMSLE on {results['test_rows']} held-out houses "
        f"({results['participants']} participants, {results['split']} split, seed "
        f"{results['seed']}):"
    )
    print(
        f"  federated (final global model of round {results['final_model_round']}, "
        f"evaluated with Keras): {fed:.4f}"
    )
    if "central_test_rmsle" in results:
        central = results["central_test_rmsle"]
        print(
            f"  central (same model, union of the shards, {results['central_epochs']} epochs): "
            f"{central:.4f}   federated / central = {fed / central:.3f}"
        )
    print(f"  mean predictor: {results['mean_predictor_test_rmsle']:.4f}")


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (
        ("loss", "training loss (after local training)"),
        ("val_loss", "validation loss (after local training)"),
        ("global_val_loss", "validation loss of the global model received"),
    ):
        ys = [r.get(key, math.nan) for r in rounds]
        left.plot(xs, ys, marker="o", markersize=3, label=label)
    left.set_yscale("log")
    left.set_xlabel("round")
    left.set_ylabel("loss (MSE of log price + L2), sample-weighted mean")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(
        xs, [r.get("global_val_rmsle", math.nan) for r in rounds], marker="o", markersize=3,
        label="validation RMSLE of the global model received",
    )  # fmt: skip
    right.axhline(results["federated_test_rmsle"], color="C1", ls="--", label="federated, test")
    if "central_test_rmsle" in results:
        right.axhline(results["central_test_rmsle"], color="C2", ls=":", label="central, test")
    right.set_xlabel("round")
    right.set_ylabel("RMSLE")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    figure.suptitle(
        f"House prices: {results['participants']} participants, {results['split']} split, "
        f"seed {results['seed']}, {results['local_epochs']} local epochs per round"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        data.read_spec(args.data_directory)  # a missing split is an error now, not at the end
        try:
            status = follow(args.coordinator_url, args.timeout, args.progress)
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.status_file is not None:
            args.status_file.parent.mkdir(parents=True, exist_ok=True)
            args.status_file.write_text(json.dumps(status, indent=1) + "\n")
        if not aggregated_rounds(status):
            print("error: the federation finished without any aggregated round", file=sys.stderr)
            return 1
        results = score(
            args.data_directory,
            status,
            args.aggregator_url,
            args.epochs,
            args.central,
            args.save_model,
            args.progress,
        )
        print_report(results)
        plot(results, args.plot)
        print(f"plot: {args.plot}")
        if args.results is not None:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(f"figures: {args.results}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
