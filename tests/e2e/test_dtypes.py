"""Half-precision models through a whole federation: real binaries, real SDK participants.

The model stays in its dtype all the way: the participants get float16 / bfloat16 arrays
(``ml_dtypes.bfloat16`` for BF16), train on them in that dtype and upload them as they are,
and the aggregator's FedAvg (accumulated in f32, stored in the model's dtype) is checked
against a replay of the rounds to the dtype's precision. The initial model comes from a
participant (round 0) or from the aggregator's ``model.initial_model`` file. Before the fix the
SDK could not upload BF16 at all, and widened a BF16 download to float32, so the aggregator
refused every update of a BF16 model it started with as a model mismatch.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import requests

import rondo
from rondo.safetensors_io import decode

N_ELEMENTS = 1000

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class HalfAdder(rondo.Participant):
    """Like python/client_examples/dummy.py's participants, in the model's own dtype: adds
    ``delta`` to every weight, in place (the arrays are writable views of the download), and
    trains on ``n`` samples. Round 0's model is a ramp of ``dtype``."""

    def __init__(self, dtype: np.dtype, delta: float, n: int) -> None:
        self.dtype = dtype
        self.delta = delta
        self.n = n
        self.seen_dtypes: set[tuple[str, np.dtype]] = set()

    def initial_weights(self) -> rondo.Weights:
        ramp = np.linspace(-2.0, 2.0, N_ELEMENTS, dtype=np.float32)
        return {
            "layer/w": ramp.reshape(N_ELEMENTS // 10, 10).astype(self.dtype),
            "layer/b": np.full(10, 0.5, np.float32).astype(self.dtype),
        }

    def train_round(self, weights: rondo.Weights, round: int):
        for name, array in weights.items():
            self.seen_dtypes.add((name, array.dtype))
            assert array.flags.writeable
            array += array.dtype.type(self.delta)
        return weights, self.n, {"loss": 1.0 / round}


def safetensors_file(weights: rondo.Weights) -> bytes:
    """A safetensors file of ``weights``, written here (not with the SDK under test)."""
    names = {np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
    header, offset = {}, 0
    for name in sorted(weights):
        array = weights[name]
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = b"".join(np.ascontiguousarray(weights[name]).tobytes() for name in sorted(weights))
    return struct.pack("<Q", len(text)) + text + data


def replay(initial: rondo.Weights, status: dict, by_name: dict[str, HalfAdder]) -> rondo.Weights:
    """The model the rounds of the coordinator's history should have produced, rounded as the
    federation rounds: each participant's update is computed in the dtype, the weighted sum is
    accumulated in f32, the average stored in the dtype."""
    name_of = {p["participant_id"]: p["name"] for p in status["participants"]}
    model = dict(initial)
    for entry in status["history"]:
        if entry["outcome"] != "aggregated" or entry["round"] == 0:
            continue
        delivered = [by_name[name_of[pid]] for pid in entry["delivered"]]
        total = sum(p.n for p in delivered)
        new = {}
        for name, array in model.items():
            acc = np.zeros(array.shape, np.float32)
            for p in delivered:
                update = array + array.dtype.type(p.delta)  # the participant's arithmetic
                acc += np.float32(p.n) * update.astype(np.float32)
            new[name] = (acc.astype(np.float64) / total).astype(array.dtype)
        model = new
    return model


@pytest.mark.parametrize("source", ["participant", "aggregator"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_half_precision_model_round_trips(
    start_federation, tmp_path: Path, dtype_name: str, source: str
) -> None:
    dtype = DTYPES[dtype_name]
    rounds = 3
    people = {
        "a": HalfAdder(dtype, 1.0, 10),
        "b": HalfAdder(dtype, 0.375, 30),
        "c": HalfAdder(dtype, -1.25, 20),
    }
    aggregator: dict[str, object] = {}
    if source == "aggregator":  # the aggregator starts with the model: no round 0
        initial_file = tmp_path / "initial.safetensors"
        initial_file.write_bytes(safetensors_file(people["a"].initial_weights()))
        aggregator["model.initial_model"] = initial_file
    federation = start_federation(
        coordinator={
            "federation.rounds": rounds,
            "federation.min_clients": 3,
            "federation.heartbeat_period_secs": 0.2,
            # A round whose updates are all refused ends soon (the bug this test is for).
            "federation.round_timeout_secs": 15,
        },
        aggregator=aggregator,
    )
    reports: dict[str, rondo.ParticipantReport] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, participant: HalfAdder) -> None:
        try:
            reports[name] = rondo.run_participant(
                participant, federation.coordinator_url, heartbeat_period=0.2, name=name
            )
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors[name] = exc

    threads = [
        threading.Thread(target=run, args=item, name=item[0], daemon=True)
        for item in people.items()
    ]
    for thread in threads:
        thread.start()

    def over(s: dict) -> bool:
        failed = any(
            e["outcome"] not in (None, "aggregated") or e.get("rejections") for e in s["history"]
        )
        return s["phase"] == "finished" or bool(errors) or failed

    status = federation.wait_for(over, timeout=60, what="all rounds")
    for thread in threads:
        thread.join(timeout=10)
    assert not errors, errors
    # Every round aggregated; no update refused (a dtype mismatch would be a rejection).
    first = 0 if source == "participant" else 1
    outcomes = [(e["round"], e["outcome"], e["reason"]) for e in status["history"]]
    assert [o[:2] for o in outcomes] == [(r, "aggregated") for r in range(first, rounds + 1)], (
        outcomes
    )
    assert not any(e.get("rejections") for e in status["history"]), status["history"]
    assert status["phase"] == "finished"
    for report in reports.values():
        assert report.final_action == "finish"
        assert report.rejected_uploads == {}
    trained = sorted(r for report in reports.values() for r in report.rounds_trained if r > 0)
    assert trained == sorted(list(range(1, rounds + 1)) * len(people))

    # The participants were handed the model in its own dtype, round after round.
    for participant in people.values():
        assert participant.seen_dtypes == {("layer/w", dtype), ("layer/b", dtype)}

    # The final global model: still that dtype, and the FedAvg of the rounds.
    response = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    response.raise_for_status()
    model, metadata = decode(response.content)
    assert metadata["rondo.round"] == str(rounds)
    initial = people["a"].initial_weights()  # each participant's are the same
    expected = replay(initial, status, people)
    eps = float(ml_dtypes.finfo(dtype).eps)
    assert set(model) == set(expected)
    for name, array in model.items():
        assert array.dtype == dtype, name
        assert array.shape == expected[name].shape
        got = array.astype(np.float64)
        want = expected[name].astype(np.float64)
        # Up to one unit in the last place, for the order of the f32 additions.
        np.testing.assert_allclose(got, want, rtol=eps, atol=eps, err_msg=name)
        # And far from the widened-to-f32 arithmetic's result only by the dtype's rounding.
        assert not np.array_equal(got, initial[name].astype(np.float64))
