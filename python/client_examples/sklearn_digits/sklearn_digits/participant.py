"""``digits-participant``: one participant training the SGD classifier on its shard.

Each round it takes the global ``coef``/``intercept``, scores them on its validation slice
(``global_accuracy``), runs ``--epochs`` epochs of ``partial_fit`` on its training rows,
scores again (``accuracy``, ``val_loss``) and uploads the new coefficients, weighted by its
number of training rows.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for real only when a participant is made
    import rondo

DEFAULT_EPOCHS = 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="digits-participant",
        description="Take part in a Rondo federation with one shard of scikit-learn's digits.",
    )
    parser.add_argument("--participant", type=int, required=True, metavar="K",
                        help="this participant's shard, 0 to N-1")  # fmt: skip
    parser.add_argument("--number-of-participants", type=positive_int, required=True,
                        metavar="N")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (default: 0)")
    parser.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, metavar="E",
        help=f"local epochs (partial_fit passes) per round (default: {DEFAULT_EPOCHS})",
    )  # fmt: skip
    parser.add_argument("--coordinator-url", default="http://127.0.0.1:8081", metavar="URL")
    parser.add_argument(
        "--heartbeat-period", type=positive_float, default=None, metavar="SECS",
        help="seconds between heartbeats (default: the coordinator's)",
    )  # fmt: skip
    parser.add_argument(
        "--connect-timeout", type=positive_float, default=60.0, metavar="SECS",
        help="how long to keep trying to reach the coordinator (default: 60)",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="log every SDK step")
    args = parser.parse_args(argv)
    if not 0 <= args.participant < args.number_of_participants:
        parser.error(
            f"--participant must be 0 to {args.number_of_participants - 1}, got {args.participant}"
        )
    return args


def make_participant(index: int, n_participants: int, seed: int, epochs: int) -> rondo.Participant:
    """The :class:`rondo.Participant` for shard ``index``."""
    import rondo
    import rondo.sklearn

    from . import data, model

    shard = data.split(n_participants, seed).shards[index]

    class Digits(rondo.Participant):
        def __init__(self) -> None:
            # One estimator for the run: its learning-rate schedule (t_) carries on.
            self.model = model.new_model()

        def initial_weights(self) -> rondo.Weights:
            return rondo.sklearn.zero_weights(data.N_FEATURES, len(data.CLASSES))

        def train_round(
            self, weights: rondo.Weights, round: int
        ) -> tuple[rondo.Weights, int, dict[str, float]]:
            rondo.sklearn.set_weights(self.model, weights, classes=data.CLASSES)
            before = model.accuracy(self.model, shard.x_val, shard.y_val)
            model.train(self.model, shard.x, shard.y, epochs, seed=seed * 7919 + round)
            metrics = {
                "loss": model.loss(self.model, shard.x, shard.y),
                "val_loss": model.loss(self.model, shard.x_val, shard.y_val),
                "accuracy": model.accuracy(self.model, shard.x_val, shard.y_val),
                "global_accuracy": before,
                "n_samples": float(len(shard.x)),
                "val_samples": float(len(shard.x_val)),
            }
            return rondo.sklearn.get_weights(self.model), len(shard.x), metrics

    return Digits()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rondo").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        import rondo
    except ImportError:
        print("error: the Rondo SDK is not installed: pip install -e python/sdk", file=sys.stderr)
        return 2
    try:
        participant = make_participant(
            args.participant, args.number_of_participants, args.seed, args.epochs
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = rondo.run_participant(
            participant,
            args.coordinator_url,
            heartbeat_period=args.heartbeat_period,
            name=f"digits-{args.participant}",
            connect_timeout=args.connect_timeout,
        )
    except rondo.RondoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    trained = [r for r in report.rounds_trained if r > 0]
    print(f"digits-{args.participant}: {report.final_action}; trained rounds {trained}")
    return 0 if report.final_action == "finish" else 1


if __name__ == "__main__":
    sys.exit(main())
