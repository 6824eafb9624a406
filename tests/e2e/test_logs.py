"""`log.format = "json"`: every line either service writes is one JSON object, and the events
of an upload, its fold and the round's close carry the round, attempt and participant of the
spans they happened in."""

from __future__ import annotations

import json

from test_rounds import Adder, run_in_thread


def test_json_logs_carry_the_round_and_the_participant(start_federation, monkeypatch):
    monkeypatch.setenv("RUST_LOG", "info,tarpc=warn,rondo_aggregator=debug")
    json_logs = {"log.format": "json"}
    federation = start_federation(
        coordinator={**json_logs, "federation.rounds": 2, "federation.min_clients": 2},
        aggregator=json_logs,
    )
    reports: dict = {}
    people = {"a": Adder(1.0, 10), "b": Adder(3.0, 30)}
    threads = [run_in_thread(p, federation.coordinator_url, n, reports) for n, p in people.items()]
    federation.wait_for(lambda s: s["phase"] == "finished", what="both rounds")
    for thread in threads:
        thread.join(timeout=20)
    ids = {pid for r in reports.values() for pid in r.participant_ids}
    federation.stop()

    events = {}
    for service in (federation.coordinator, federation.aggregator):
        lines = [line for line in service.log.read_text().splitlines() if line.strip()]
        assert lines, service.name
        events[service.name] = [json.loads(line) for line in lines]  # each one JSON
        for event in events[service.name]:
            assert {"timestamp", "level", "fields", "target"} <= set(event), event

    accepted = [e for e in events["aggregator"] if e["fields"].get("message") == "update accepted"]
    assert len(accepted) == 1 + 2 * 2, "round 0's upload and two per training round"
    for event in accepted:
        fold = event["span"]
        assert fold["name"] == "fold" and fold["participant"] in ids, event
        assert int(fold["round"]) in (0, 1, 2) and int(fold["attempt"]) == 0
    closed = [e for e in events["aggregator"] if e["fields"].get("message") == "round closed"]
    assert sorted(int(e["span"]["round"]) for e in closed) == [0, 1, 2]
    assert all(e["span"]["name"] == "close" for e in closed)
