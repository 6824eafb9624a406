"""A global model that is not finite is never published.

Finite values with sample counts within `limits.max_n_samples` can still sum past float32's
range (3e38 × 1e9 twice). The round then fails with that reason, the previous global model
stays, and the next attempt of the round aggregates as usual.
"""

from __future__ import annotations

import numpy as np
import requests
from test_bad_input import round_one, upload_bytes, weights  # noqa: F401 (fixture)

from rondo.safetensors_io import decode


def upload(ticket: dict, value: float, n_samples: int) -> requests.Response:
    return requests.post(
        ticket["upload_url"],
        data=upload_bytes(weights(value), n_samples=str(n_samples)),
        headers={"Authorization": f"Bearer {ticket['token']}"},
        timeout=10,
    )


def test_an_overflowing_round_fails_and_the_model_stays_finite(round_one):  # noqa: F811
    federation, a, b, tickets = round_one
    for person in (a, b):
        assert upload(tickets[person.id], 3e38, 1_000_000_000).status_code == 200
    status = federation.wait_for(
        lambda s: any(e["round"] == 1 and e["outcome"] for e in s["history"]),
        what="round 1 attempt 0 to close",
    )
    first = next(e for e in status["history"] if e["round"] == 1)
    assert first["outcome"] == "failed", first
    assert "not finite" in first["reason"], first

    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert model.headers["x-rondo-round"] == "0", "the previous model stays"
    tensors, _ = decode(model.content)
    assert all(np.all(t == 0.0) for t in tensors.values())

    # The round runs again, and good updates make its model.
    federation.wait_for(
        lambda s: s["phase"] == "training" and s["attempt"] == 1, what="round 1 attempt 1"
    )
    again = {p.id: p.post("start_training").json() for p in (a, b)}
    assert upload(again[a.id], 1.0, 1).status_code == 200
    assert upload(again[b.id], 5.0, 3).status_code == 200
    federation.wait_for(
        lambda s: any(
            e["round"] == 1 and e["attempt"] == 1 and e["outcome"] == "aggregated"
            for e in s["history"]
        ),
        what="round 1 attempt 1 to aggregate",
    )
    model = requests.get(f"{federation.aggregator_url}/v1/model", timeout=10)
    assert model.headers["x-rondo-round"] == "1"
    tensors, _ = decode(model.content)
    assert all(np.all(t == 4.0) for t in tensors.values())
