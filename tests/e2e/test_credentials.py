"""Credentials are bound: an upload token works for one participant, in one round, while that
round is open; a participant's credential expires when it is dropped.

Each misuse is refused with its documented code and changes nothing: the accepted updates, the
participants and the history are as they were. (Joining without or with a wrong secret is
tests/e2e/test_membership.py; a forged RPC from a process without the link key is
tests/e2e/test_link_key.py.)
"""

from __future__ import annotations

import time

import numpy as np
import requests

# round_one: the fixture of a federation in round 1, its two participants and their tickets.
from test_bad_input import Person, assert_error, round_one, upload_bytes, weights  # noqa: F401

from rondo.safetensors_io import decode


def upload(ticket: dict, body: bytes, as_participant: str | None = None, url: str | None = None):
    headers = {"Authorization": f"Bearer {ticket['token']}"}
    if as_participant:
        headers["X-Rondo-Participant"] = as_participant
    return requests.post(url or ticket["upload_url"], data=body, headers=headers, timeout=10)


def test_tokens_are_bound_to_their_participant_and_round(round_one):  # noqa: F811
    federation, a, b, round1 = round_one
    assert round1[a.id]["round"] == 1

    # B with A's token, saying who it is: refused, and A's token still works for A.
    stolen = upload(round1[a.id], upload_bytes(weights(9.0)), as_participant=b.id)
    assert_error(stolen, 403, "token_not_yours")
    assert federation.aggregator_status()["accepted"] == []
    assert upload(round1[a.id], upload_bytes(weights(1.0)), as_participant=a.id).status_code == 200
    assert upload(round1[b.id], upload_bytes(weights(3.0)), as_participant=b.id).status_code == 200
    status = federation.wait_for(lambda s: s["round"] == 2, what="round 2 to open")
    history = status["history"]

    # Round 1 is closed: its tokens have expired, in its own path and in the next round's.
    after_close = upload(round1[a.id], upload_bytes(weights(5.0)), as_participant=a.id)
    assert_error(after_close, 401, "token_expired")
    next_round_url = round1[a.id]["upload_url"].replace("/rounds/1/", "/rounds/2/")
    replayed = upload(round1[a.id], upload_bytes(weights(5.0)), url=next_round_url)
    assert_error(replayed, 401, "token_expired")
    # Nothing changed: round 2 has no update, round 1's record is as it was.
    assert federation.aggregator_status()["accepted"] == []
    assert federation.status()["history"] == history
    entry = next(e for e in history if e["round"] == 1)
    assert sorted(entry["delivered"]) == sorted([a.id, b.id])
    # The model is round 1's average, untouched by the refused uploads: (1 + 3) / 2.
    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert model.headers["x-rondo-round"] == "1"
    tensors, _ = decode(model.content)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(tensor, np.full_like(tensor, 2.0), err_msg=name)


def test_a_dropped_participants_credential_has_expired(start_federation):
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 3,  # no round opens: only the credentials matter here
            "federation.heartbeat_period_secs": 0.2,
            "federation.heartbeat_timeout_secs": 1,
        }
    )
    a = Person(federation.coordinator_url, "a")
    assert a.post("heartbeat").json()["action"] == "standby"
    federation.wait_for(
        lambda s: any(p["state"] == "dropped" for p in s["participants"]),
        what="the silent participant to be dropped",
    )
    before = federation.status()["participants"]
    assert_error(a.post("start_training"), 401, "credential_expired")
    evaluation = requests.post(
        f"{a.url}/v1/participants/{a.id}/evaluation",
        json={"round": 0, "loss": 1.0, "n_samples": 1},
        headers={"Authorization": f"Bearer {a.secret}"},
        timeout=10,
    )
    assert_error(evaluation, 401, "credential_expired")
    answer = a.post("heartbeat").json()
    assert answer["action"] == "rejected" and "join again" in answer["reason"], answer
    time.sleep(0.3)
    # Still dropped, nothing revived: the same participants in the same states.
    after = federation.status()["participants"]
    assert [(p["participant_id"], p["state"]) for p in after] == [
        (p["participant_id"], p["state"]) for p in before
    ]
    # A wrong secret is still told apart from an expired one.
    assert_error(a.post("start_training", secret="0" * 64), 401, "invalid_secret")
