"""A participant that hangs up during its upload never wedges a round.

Each round, participant `a` opens an upload by hand and disconnects at another point: in the
middle of the safetensors header, in the middle of the tensor bytes, right after the last
byte, and while the aggregator is folding the update in (the model is large enough, in a debug
build, for the fold to take a while). `b` then uploads, and `a` retries with the same token:
it is accepted, or refused as a duplicate when the hung-up attempt had been counted. Every
round must close, the coordinator's history must name exactly who the aggregator counted, and
the global model must be exactly the weighted average, so nothing was counted twice or lost.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import requests
from safetensors.numpy import save_file
from test_bad_input import Person

from rondo.safetensors_io import decode, encode

ELEMENTS = 4_000_000  # 16 MB of float32
CASES = {
    "mid_header": lambda body: body[:20],
    "mid_body": lambda body: body[: len(body) // 2],
    "after_last_byte": lambda body: body,
    "during_fold": lambda body: body,
    "late_in_fold": lambda body: body,
}
WAIT_BEFORE_HANGING_UP = {"during_fold": 0.03, "late_in_fold": 0.15}


def upload(ticket: dict, value: float, n_samples: int) -> requests.Response:
    body = encode({"w": np.full(ELEMENTS, value, np.float32)}, {"rondo.n_samples": str(n_samples)})
    return requests.post(
        ticket["upload_url"],
        data=body,
        headers={"Authorization": f"Bearer {ticket['token']}"},
        timeout=60,
    )


def hang_up_during_upload(ticket: dict, value: float, n_samples: int, case: str) -> None:
    body = encode({"w": np.full(ELEMENTS, value, np.float32)}, {"rondo.n_samples": str(n_samples)})
    host, port = ticket["upload_url"].split("/")[2].rsplit(":", 1)
    path = "/" + ticket["upload_url"].split("/", 3)[3]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {ticket['token']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head + CASES[case](body))
    time.sleep(WAIT_BEFORE_HANGING_UP.get(case, 0.0))
    sock.close()


def test_rounds_close_whenever_a_participant_hangs_up(start_federation, tmp_path):
    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(ELEMENTS, np.float32)}, str(initial))
    rounds = len(CASES)
    federation = start_federation(
        coordinator={
            "federation.rounds": rounds,
            "federation.min_clients": 2,
            "federation.heartbeat_timeout_secs": 300,
            "federation.round_timeout_secs": 20,
        },
        aggregator={"model.initial_model": initial},
    )
    a = Person(federation.coordinator_url, "a")
    b = Person(federation.coordinator_url, "b")
    counted_on_hang_up = {}
    for round_number, case in enumerate(CASES, start=1):
        federation.wait_for(
            lambda s, r=round_number: s["phase"] == "training" and s["round"] == r,
            what=f"round {round_number} to open",
        )
        ta, tb = (p.post("start_training").json() for p in (a, b))
        assert ta["round"] == round_number
        hang_up_during_upload(ta, float(round_number), 1, case)
        assert upload(tb, 10.0 * round_number, 3).status_code == 200
        # The hung-up attempt was counted whole, or not at all: the retry says which.
        deadline = time.monotonic() + 30
        while True:
            retry = upload(ta, float(round_number), 1)
            code = retry.json().get("error", {}).get("code") if retry.status_code != 200 else None
            if code != "upload_in_progress" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # 409: counted and the round still open; 401 `token_expired`: counted, and with b's
        # update the round had all it waited for and closed.
        assert (retry.status_code, code) in (
            (200, None),
            (409, "duplicate_update"),
            (401, "token_expired"),
        ), (case, retry.text)
        counted_on_hang_up[case] = retry.status_code != 200
        status = federation.wait_for(
            lambda s, r=round_number: any(
                e["round"] == r and e["outcome"] is not None for e in s["history"]
            ),
            timeout=40,
            what=f"round {round_number} ({case}) to close",
        )
        record = next(e for e in status["history"] if e["round"] == round_number)
        assert record["outcome"] == "aggregated", (case, record)
        assert sorted(record["delivered"]) == sorted([a.id, b.id]), (case, record)
        assert {d["participant_id"]: d["n_samples"] for d in record["deliveries"]} == {
            a.id: 1,
            b.id: 3,
        }, (case, record)
        model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=30)
        assert model.headers["x-rondo-round"] == str(round_number)
        weights, _ = decode(model.content)
        # (1·r + 3·10r) / 4, exactly: a's update counted once.
        np.testing.assert_array_equal(weights["w"][:5], np.full(5, 7.75 * round_number))
        assert np.all(weights["w"] == np.float32(7.75 * round_number)), case
    # Nothing is left hanging: the aggregator exits promptly and cleanly on SIGTERM.
    federation.aggregator.process.terminate()
    assert federation.aggregator.process.wait(timeout=20) == 0
    # A hang-up before the last byte never counts.
    assert not counted_on_hang_up["mid_header"] and not counted_on_hang_up["mid_body"]
    print("counted on hang-up:", counted_on_hang_up)
