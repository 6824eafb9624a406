"""Only members get in: the join secret, the allowlist of names, and no secret in the logs.

Each refusal has its documented code and leaves the federation as it was; a whole federation
run at debug level with a join secret and a link key logs none of the secrets and tokens that
went by.
"""

from __future__ import annotations

import os
import threading

import pytest
import requests
from safetensors.numpy import save_file
from test_bad_input import upload_bytes, weights
from test_openapi import check_response, document
from test_rounds import Adder

import rondo

SECRET = "open-sesame-0123456789"


def join(url: str, secret: str | None, name: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {"name": name} if name else {}
    return requests.post(f"{url}/v1/participants", json=body, headers=headers, timeout=5)


def test_joining_needs_the_join_secret_and_an_allowed_name(start_federation, tmp_path):
    secret_file = tmp_path / "join.secret"
    secret_file.write_text(SECRET + "\n")
    federation = start_federation(
        coordinator={
            "federation.join_secret_file": secret_file,
            "federation.allowed_participants": "hospital-a, hospital-b",
        }
    )
    url = federation.coordinator_url
    doc = document("coordinator")
    cases = [
        (None, "hospital-a", 401, "missing_join_secret"),
        ("open-sesame", "hospital-a", 401, "invalid_join_secret"),
        (SECRET, "clinic-z", 403, "not_allowed"),
        (SECRET, None, 403, "not_allowed"),
    ]
    for secret, name, status, code in cases:
        answer = join(url, secret, name)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
        check_response(doc, "/v1/participants", "post", answer)
        assert SECRET not in answer.text
    assert federation.status()["participants"] == [], "nothing changed"
    answer = join(url, SECRET, "hospital-a")
    assert answer.status_code == 201, answer.text
    assert [p["name"] for p in federation.status()["participants"]] == ["hospital-a"]

    # The SDK presents it (from the argument or $RONDO_JOIN_SECRET) and stops at a refusal.
    with pytest.raises(rondo.ApiError) as refused:
        rondo.run_participant(Adder(1.0, 1), url, name="hospital-b", join_secret="wrong-secret")
    assert refused.value.code == "invalid_join_secret"


def test_sdk_participants_with_the_secret_run_a_federation(start_federation, monkeypatch):
    federation = start_federation(
        coordinator={
            "federation.join_secret": SECRET,
            "federation.rounds": 1,
            "federation.min_clients": 2,
        }
    )
    monkeypatch.setenv("RONDO_JOIN_SECRET", SECRET)
    reports = {}

    def run(name: str) -> None:
        reports[name] = rondo.run_participant(
            Adder(2.0, 5), federation.coordinator_url, heartbeat_period=0.2, name=name
        )

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {n: r.final_action for n, r in reports.items()} == {"a": "finish", "b": "finish"}


def test_no_secret_or_token_reaches_the_logs_of_a_debug_run(start_federation, tmp_path):
    """A whole federation at RUST_LOG=debug: the join secret, the link key, every participant
    secret and every upload token went through both services, and none is in their logs."""
    key_file = tmp_path / "link.key"
    link_key = "link-key-0123456789-abcdef"
    key_file.write_text(link_key)
    initial = tmp_path / "initial.safetensors"
    save_file(weights(0.0), str(initial))
    os.environ["RUST_LOG"] = "debug"
    try:
        federation = start_federation(
            coordinator={
                "federation.join_secret": SECRET,
                "federation.rounds": 2,
                "federation.min_clients": 2,
                "federation.heartbeat_timeout_secs": 120,
                "rpc.key_file": key_file,
            },
            aggregator={"model.initial_model": initial, "rpc.key_file": key_file},
        )
    finally:
        del os.environ["RUST_LOG"]
    secrets = [SECRET, link_key]
    people = []
    for name in "ab":
        answer = join(federation.coordinator_url, SECRET, name).json()
        people.append(answer)
        secrets.append(answer["secret"])
    for round_ in (1, 2):
        federation.wait_for(
            lambda s, r=round_: s["phase"] == "training" and s["round"] == r, what=f"round {round_}"
        )
        for person in people:
            auth = {"Authorization": f"Bearer {person['secret']}"}
            base = f"{federation.coordinator_url}/v1/participants/{person['participant_id']}"
            requests.post(f"{base}/heartbeat", headers=auth, timeout=5).raise_for_status()
            ticket = requests.post(f"{base}/start_training", headers=auth, timeout=5).json()
            secrets.append(ticket["token"])
            model = requests.get(
                ticket["model_url"], headers={"Authorization": f"Bearer {ticket['token']}"}
            )
            assert model.status_code == 200
            answer = requests.post(
                ticket["upload_url"],
                data=upload_bytes(weights(float(round_))),
                headers={"Authorization": f"Bearer {ticket['token']}"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
        federation.wait_for(
            lambda s, r=round_: any(
                e["round"] == r and e["outcome"] == "aggregated" for e in s["history"]
            ),
            what=f"round {round_} to aggregate",
        )
    federation.stop()
    logs = {s.name: s.log.read_text() for s in (federation.coordinator, federation.aggregator)}
    assert all("DEBUG" in text for text in logs.values()), "the run did log at debug level"
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a secret or token is in the {name} log"
    assert len(secrets) == 2 + 2 + 4
