"""``run-participant``: one federation participant training the Keras regressor on its shard.

Each round it loads the global model, evaluates it on its validation slice (``global_val_*``:
the federation's model as this site sees it), trains ``--epochs`` epochs on its training rows,
evaluates again (``val_*``) and uploads the new weights with ``n_samples`` = its training
rows. The data never leaves the process: only weights and a few numbers do.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import data
from .cli import positive_float, positive_int, run_command

if TYPE_CHECKING:  # imported for real only when a participant is made
    import rondo

DEFAULT_EPOCHS = 5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run-participant",
        description="Take part in a Rondo federation with one shard of the house-prices data.",
    )
    parser.add_argument("--data-directory", type=Path, default=Path("data"), metavar="DIR")
    parser.add_argument(
        "--shard", type=int, default=None, metavar="K",
        help="the shard to train on (default: the lowest one no other participant on this "
        "machine has claimed)",
    )  # fmt: skip
    parser.add_argument("--coordinator-url", default="http://127.0.0.1:8081", metavar="URL")
    parser.add_argument(
        "--heartbeat-period", type=positive_float, default=None, metavar="SECS",
        help="seconds between heartbeats (default: the coordinator's)",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="E",
        help=f"local epochs per round (default: {DEFAULT_EPOCHS})",
    )  # fmt: skip
    parser.add_argument(
        "--connect-timeout", type=positive_float, default=60.0, metavar="SECS",
        help="how long to keep trying to reach the coordinator (default: 60)",
    )  # fmt: skip
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar for local training (default: when stderr is a terminal)",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every SDK step")
    return parser.parse_args(argv)


def make_participant(
    data_dir: Path, shard: int, epochs: int, progress: bool | None = None
) -> rondo.Participant:
    """The :class:`rondo.Participant` for ``shard`` (imports Keras)."""
    import rondo
    import rondo.keras

    from . import model as keras_model

    spec = data.read_spec(data_dir)
    train_rows, val_rows = data.read_shard(data_dir, shard)
    x, y = data.features(train_rows, spec), data.log_prices(train_rows)
    x_val, y_val = data.features(val_rows, spec), data.log_prices(val_rows)
    hp = keras_model.Hyperparameters()

    class HousePrices(rondo.Participant):
        def __init__(self) -> None:
            # One model for the whole run: Keras compiles its training step once, and the
            # optimizer's state carries over between rounds (resetting Adam every round made
            # it converge much worse in our runs).
            self.model = keras_model.build_model(spec, hp)

        def initial_weights(self) -> rondo.Weights:
            return rondo.keras.get_weights(self.model)

        def train_round(
            self, weights: rondo.Weights, round: int
        ) -> tuple[rondo.Weights, int, dict[str, float]]:
            rondo.keras.set_weights(self.model, weights)
            before = keras_model.evaluate(self.model, x_val, y_val)
            loss = keras_model.fit(
                self.model, x, y, epochs, hp.batch_size, f"shard {shard} round {round}", progress
            )
            after = keras_model.evaluate(self.model, x_val, y_val)
            metrics = {
                "loss": loss,
                "val_loss": after["loss"],
                "val_rmsle": after["rmse"],
                "global_val_loss": before["loss"],
                "global_val_rmsle": before["rmse"],
                "n_samples": float(len(x)),
                "val_samples": float(len(x_val)),
            }
            return rondo.keras.get_weights(self.model), len(x), metrics

    return HousePrices()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rondo").setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    def run() -> int:
        try:
            import rondo
        except ImportError:
            raise data.DataError(
                "the Rondo SDK is not installed: pip install -e python/sdk"
            ) from None
        info = data.read_split_info(args.data_directory)
        n_shards = len(info.get("shards", []))
        # Claimed before Keras is imported: a second participant for a taken shard is told so
        # at once. The claim lasts as long as this process.
        claim = data.claim_shard(args.data_directory, n_shards, args.shard)
        print(
            f"shard {claim.shard} of {n_shards} ({info.get('split')} split), "
            f"coordinator {args.coordinator_url}",
            flush=True,
        )
        participant = make_participant(args.data_directory, claim.shard, args.epochs, args.progress)
        report = rondo.run_participant(
            participant,
            args.coordinator_url,
            heartbeat_period=args.heartbeat_period,
            name=f"house-prices-{claim.shard}",
            connect_timeout=args.connect_timeout,
        )
        claim.release()
        trained = [r for r in report.rounds_trained if r > 0]
        print(
            f"shard {claim.shard}: {report.final_action}; trained rounds {trained}"
            + (f"; refused {report.rejected_uploads}" if report.rejected_uploads else ""),
            flush=True,
        )
        return 0 if report.final_action == "finish" else 1

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
