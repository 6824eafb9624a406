"""run_participant against the scripted fake services of conftest.py."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import AddOne, FakeRondo, free_port

import rondo
import rondo.runner
from rondo import (
    ApiError,
    CoordinatorUnavailable,
    DTypeUnavailable,
    ParticipantReport,
    Weights,
    run_participant,
)
from rondo.runner import LONG_POLL_SECS
from rondo.transport import HttpClient


def run(
    fake: FakeRondo, participant: rondo.Participant | None = None, **kwargs
) -> ParticipantReport:
    kwargs.setdefault("connect_timeout", 5.0)
    return run_participant(participant or AddOne(), fake.url, **kwargs)


def assert_weights_equal(actual: Weights, expected: Weights) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        np.testing.assert_array_equal(actual[name], array)


def test_full_protocol(serve) -> None:
    fake = serve(rounds=2)
    participant = AddOne()
    report = run(fake, participant, name="alice")

    assert report == ParticipantReport(
        participant_ids=["p1"], rounds_trained=[0, 1, 2], rejected_uploads={}, final_action="finish"
    )
    assert fake.joins == [{"name": "alice"}]
    assert fake.start_trainings == [("p1", 0), ("p1", 1), ("p1", 2)]
    assert fake.downloads == [1, 2]
    assert [u.round for u in fake.uploads] == [0, 1, 2]
    # A sized body: sent with a Content-Length, the pieces passed to the socket as they are.
    assert not any(u.chunked for u in fake.uploads)

    initial = AddOne().initial_weights()
    round0, round1, round2 = fake.uploads
    assert_weights_equal(round0.weights, initial)
    assert round0.metadata == {"rondo.n_samples": "1"}
    assert_weights_equal(round1.weights, {k: v + v.dtype.type(1) for k, v in initial.items()})
    assert round1.metadata["rondo.n_samples"] == "5"
    assert json.loads(round1.metadata["rondo.metrics"]) == {"loss": 0.5}
    assert_weights_equal(round2.weights, {k: v + v.dtype.type(2) for k, v in initial.items()})
    assert json.loads(round2.metadata["rondo.metrics"]) == {"loss": 0.25}
    # train_round saw the downloaded global model of each round.
    assert [r for r, _ in participant.seen] == [1, 2]
    assert_weights_equal(participant.seen[0][1], initial)


def test_join_without_name_sends_no_body(serve) -> None:
    fake = serve(rounds=0)
    report = run(fake)
    assert fake.joins == [{}]
    assert report.rounds_trained == [0]
    assert report.final_action == "finish"


def test_heartbeats_ask_for_long_holds_whatever_the_period(serve) -> None:
    # The coordinator caps the hold itself (at half its heartbeat timeout), so the SDK always
    # asks for the longest hold: while nothing happens, one request per hold, not per period.
    for period in (None, 0.05):
        fake = serve(rounds=1, heartbeat_period=0.2)
        run(fake, heartbeat_period=period)
        assert len(fake.heartbeat_log) >= 3
        waits = {float(e["query"]["wait_secs"]) for e in fake.heartbeat_log}
        assert waits == {LONG_POLL_SECS}


def test_heartbeats_are_long_polls_since_the_previous_state(serve) -> None:
    fake = serve(rounds=2, reject_heartbeats={4})
    report = run(fake)
    assert report.final_action == "finish"
    log = fake.heartbeat_log
    assert "since" not in log[0]["query"]  # nothing to compare with yet
    for previous, entry in zip(log, log[1:], strict=False):
        if entry["pid"] != previous["pid"]:
            assert "since" not in entry["query"]  # joined again: a new identity starts afresh
        else:
            assert entry["query"]["since"] == previous["state"]
    assert [e["pid"] for e in log].count("p2") >= 2  # the rejection led to a new identity
    assert log[-1]["state"] == "finish"


@pytest.mark.parametrize("hold", [True, False])
def test_unchanged_state_is_not_polled_in_a_busy_loop(serve, hold: bool) -> None:
    """Held by the coordinator (hold), or answered at once though unchanged (a server that
    does not wait): either way about one heartbeat per period while nothing changes."""

    class Slow(AddOne):
        def train_round(self, weights: Weights, round: int):
            time.sleep(1.0)
            return super().train_round(weights, round)

    fake = serve(rounds=1, heartbeat_period=0.2, hold=hold)
    started = time.monotonic()
    report = run(fake, Slow())
    assert report.rounds_trained == [0, 1]
    elapsed = time.monotonic() - started
    # Two state changes (round 1 opens, finish) cost an extra immediate poll each.
    assert len(fake.heartbeats) <= elapsed / 0.2 + 4
    held = [e for e in fake.heartbeat_log if e["state"] == e["query"].get("since")]
    assert len(held) >= 3


def test_works_with_a_coordinator_without_long_polls(serve) -> None:
    fake = serve(rounds=2, heartbeat_period=0.1, long_poll=False)
    report = run(fake)
    assert report.rounds_trained == [0, 1, 2]
    assert report.final_action == "finish"
    # No `state` came back, so no `since` is sent and heartbeats are a period apart.
    assert all("since" not in e["query"] for e in fake.heartbeat_log)
    assert all(e["state"] is None for e in fake.heartbeat_log)
    gaps = np.diff([t for t, _ in fake.heartbeats])
    assert len(gaps) >= 2
    assert gaps.min() > 0.075


@pytest.mark.parametrize("transfer", ["length", "chunked", "close"])
def test_downloads_are_writable_views_of_one_buffer(serve, transfer: str) -> None:
    class InPlace(AddOne):
        def train_round(self, weights: Weights, round: int):
            self.seen.append((round, {k: v.copy() for k, v in weights.items()}))
            for array in weights.values():
                assert array.flags.writeable
                # A view of the download buffer, not an array of its own.
                assert not array.flags.owndata
                array += array.dtype.type(1)
            return weights, 5, {}

    fake = serve(rounds=2, model_transfer=transfer)
    participant = InPlace()
    report = run(fake, participant)
    assert report.rounds_trained == [0, 1, 2]
    initial = AddOne().initial_weights()
    assert_weights_equal(participant.seen[0][1], initial)
    assert_weights_equal(
        participant.seen[1][1], {k: v + v.dtype.type(1) for k, v in initial.items()}
    )
    assert_weights_equal(
        fake.uploads[-1].weights, {k: v + v.dtype.type(2) for k, v in initial.items()}
    )


def test_truncated_download_is_a_network_error(serve, caplog: pytest.LogCaptureFixture) -> None:
    fake = serve(rounds=2, truncate_downloads={1})
    with caplog.at_level("WARNING", logger="rondo"):
        report = run(fake)
    assert report.rejected_uploads == {1: "network_error"}
    assert report.rounds_trained == [0, 2]
    assert report.final_action == "finish"
    pattern = r"download of \S+/v1/rounds/1/model .*after \d+ of \d+ bytes"
    assert any(re.search(pattern, r.getMessage()) for r in caplog.records)


def test_refused_upload_is_recorded_and_not_retried(serve) -> None:
    fake = serve(rounds=2, upload_errors={1: (400, "model_mismatch")})
    report = run(fake)
    assert report.rejected_uploads == {1: "model_mismatch"}
    assert report.rounds_trained == [0, 2]
    assert report.final_action == "finish"
    # Heartbeats kept saying `train 1` after the refusal, yet round 1 was started only once.
    assert fake.start_trainings == [("p1", 0), ("p1", 1), ("p1", 2)]


def test_refused_upload_is_logged_with_code(serve, caplog: pytest.LogCaptureFixture) -> None:
    fake = serve(rounds=1, upload_errors={1: (401, "token_expired")})
    with caplog.at_level("WARNING", logger="rondo"):
        run(fake)
    assert any("token_expired" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("option", ["reject_heartbeats", "forget_heartbeats"])
def test_rejected_participant_joins_again(serve, option: str) -> None:
    fake = serve(rounds=2, **{option: {3}})
    report = run(fake, name="bob")
    assert report.participant_ids == ["p1", "p2"]
    assert report.final_action == "finish"
    assert fake.joins == [{"name": "bob"}, {"name": "bob"}]
    assert {pid for _, pid in fake.heartbeats[3:]} == {"p2"}
    assert fake.uploads[-1].participant_id == "p2"


def test_survives_heartbeat_network_errors(serve) -> None:
    fake = serve(rounds=2, drop_heartbeats=set(range(2, 30)))
    report = run(fake)
    assert report.final_action == "finish"
    assert report.rounds_trained == [0, 1, 2]


def test_stop_event_in_train_round_stops_heartbeats_and_upload(serve) -> None:
    stop = threading.Event()
    stopped_at: list[float] = []

    class Dies(AddOne):
        def train_round(self, weights: Weights, round: int):
            stop.set()  # a participant that dies mid-round...
            stopped_at.append(time.monotonic())
            time.sleep(0.3)  # ...while its training still takes a while
            return super().train_round(weights, round)

    fake = serve(rounds=2, heartbeat_period=0.02)
    report = run(fake, Dies(), stop_event=stop)
    assert time.monotonic() - stopped_at[0] < 1.0
    assert report.final_action == "stopped"
    assert report.rounds_trained == [0]
    assert [u.round for u in fake.uploads] == [0]
    time.sleep(0.1)
    # At most one heartbeat already in flight when the event was set; none after.
    assert max(t for t, _ in fake.heartbeats) < stopped_at[0] + 0.05


def test_stop_event_from_another_thread_returns_promptly(serve) -> None:
    fake = serve(rounds=10**6)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    report = run(fake, stop_event=stop)
    assert report.final_action == "stopped"
    assert time.monotonic() - started < 1.5


def test_joins_a_coordinator_that_starts_late(serve) -> None:
    port = free_port()
    result: dict[str, ParticipantReport] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            report=run_participant(AddOne(), f"http://127.0.0.1:{port}", connect_timeout=10.0)
        )
    )
    thread.start()
    time.sleep(1.0)
    serve(port=port, rounds=1)
    thread.join(timeout=15.0)
    assert not thread.is_alive()
    assert result["report"].final_action == "finish"
    assert result["report"].rounds_trained == [0, 1]


def test_unreachable_coordinator_raises_after_connect_timeout() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(CoordinatorUnavailable):
        run_participant(AddOne(), url, connect_timeout=0.5)
    assert time.monotonic() - started < 3.0


def test_join_refused_raises_api_error(serve) -> None:
    fake = serve(join_error=(400, "invalid_body"))
    with pytest.raises(ApiError) as info:
        run(fake)
    assert (info.value.status, info.value.code) == (400, "invalid_body")


def test_exception_in_train_round_propagates(serve) -> None:
    class Broken(AddOne):
        def train_round(self, weights: Weights, round: int):
            raise RuntimeError("boom")

    fake = serve(rounds=1)
    with pytest.raises(RuntimeError, match="boom"):
        run(fake, Broken())


def test_bad_n_samples_is_reported(serve) -> None:
    class Zero(AddOne):
        def train_round(self, weights: Weights, round: int):
            return weights, 0, {}

    fake = serve(rounds=1)
    with pytest.raises(ValueError, match="n_samples"):
        run(fake, Zero())


def offered_buffers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for every model download, whether the runner offered a buffer to reuse."""
    offered: list[bool] = []
    download = HttpClient.download

    def spy(self: HttpClient, url: str, **kwargs: Any) -> np.ndarray:
        offered.append(kwargs.get("into") is not None)
        return download(self, url, **kwargs)

    monkeypatch.setattr(HttpClient, "download", spy)
    return offered


def test_download_buffer_is_reused_when_nothing_of_it_is_kept(serve, monkeypatch) -> None:
    class InPlaceForgetful(AddOne):
        def train_round(self, weights: Weights, round: int):
            for array in weights.values():
                array += array.dtype.type(1)
            return weights, 5, {}

    offered = offered_buffers(monkeypatch)
    fake = serve(rounds=3)
    report = run(fake, InPlaceForgetful())
    assert report.rounds_trained == [0, 1, 2, 3]
    assert offered == [False, True, True]
    initial = AddOne().initial_weights()
    assert_weights_equal(
        fake.uploads[-1].weights, {k: v + v.dtype.type(3) for k, v in initial.items()}
    )


def test_weights_a_participant_keeps_are_never_overwritten(serve, monkeypatch) -> None:
    offered = offered_buffers(monkeypatch)
    fake = serve(rounds=3)
    participant = AddOne()  # keeps every round's downloaded arrays in `seen`
    run(fake, participant)
    assert offered == [False, False, False]
    initial = participant.initial_weights()
    for k, (round_, weights) in enumerate(participant.seen):
        assert round_ == k + 1
        assert_weights_equal(weights, {n: v + v.dtype.type(k) for n, v in initial.items()})


@pytest.fixture
def quick_upload_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rondo.runner, "UPLOAD_RETRY_DELAY", 0.01)
    monkeypatch.setattr(rondo.runner, "MAX_BACKOFF", 0.01)


def test_an_upload_lost_on_the_network_is_sent_again(serve, quick_upload_retries) -> None:
    """The transport never re-sends an upload by itself; the runner does, as the aggregator
    takes one update per token."""
    fake = serve(rounds=2, drop_uploads={2}, linger=50)
    report = run(fake)
    assert report.rounds_trained == [0, 1, 2] and report.rejected_uploads == {}
    assert fake.upload_requests == [(0, "p1"), (1, "p1"), (1, "p1"), (2, "p1")]
    assert [u.round for u in fake.uploads] == [0, 1, 2]


def test_an_upload_that_got_through_is_not_sent_a_third_time(serve, quick_upload_retries) -> None:
    """The update was accepted but the answer was lost: the retry is refused as a duplicate,
    which tells the runner that the update is in."""
    fake = serve(rounds=2, drop_uploads={2}, accept_dropped=True, linger=50)
    report = run(fake)
    assert report.rounds_trained == [0, 1, 2] and report.rejected_uploads == {}
    assert fake.upload_requests == [(0, "p1"), (1, "p1"), (1, "p1"), (2, "p1")]
    assert [u.round for u in fake.uploads] == [0, 1, 2]  # round 1's update counted once


def test_a_retry_that_finds_the_round_closed_asks_the_history(serve, quick_upload_retries) -> None:
    """The lost upload was the round's last, so the round closed at once and the retry is
    refused as token_expired: the coordinator's history tells that the update is in."""
    fake = serve(rounds=2, drop_uploads={2}, accept_dropped=True, expire_tokens=True)
    report = run(fake)
    assert report.rounds_trained == [0, 1, 2] and report.rejected_uploads == {}
    assert fake.upload_requests == [(0, "p1"), (1, "p1"), (1, "p1"), (2, "p1")]


def test_a_retry_too_late_for_its_round_is_a_network_error(
    serve, quick_upload_retries, monkeypatch
) -> None:
    """The lost upload never got in and its round closed without it: reported as the network
    failure it was (not as token_expired)."""
    monkeypatch.setattr(rondo.runner, "HISTORY_WAIT_SECS", 0.2)
    fake = serve(rounds=2, drop_uploads={2}, close_on_drop=True, expire_tokens=True)
    report = run(fake)
    assert report.rounds_trained == [0, 2] and report.rejected_uploads == {1: "network_error"}
    assert fake.upload_requests == [(0, "p1"), (1, "p1"), (1, "p1"), (2, "p1")]


def test_a_retry_waits_for_an_attempt_still_being_read(serve, quick_upload_retries) -> None:
    fake = serve(rounds=1, drop_uploads={2}, busy_uploads={3}, linger=50)
    report = run(fake)
    assert report.rounds_trained == [0, 1] and report.rejected_uploads == {}
    assert fake.upload_requests == [(0, "p1")] + [(1, "p1")] * 3


def test_upload_in_progress_without_a_failure_before_is_a_refusal(serve) -> None:
    fake = serve(rounds=1, busy_uploads={2}, linger=3)
    report = run(fake)
    assert report.rejected_uploads == {1: "upload_in_progress"}
    assert fake.upload_requests.count((1, "p1")) == 1


def test_upload_retries_are_bounded_and_then_the_round_is_tried_again(
    serve, quick_upload_retries
) -> None:
    """An upload is sent at most 1 + UPLOAD_RETRIES times; when all fail on the network and the
    coordinator still says "train", the whole round is tried again (a new download, training,
    upload), which gets in here."""
    fake = serve(rounds=2, drop_uploads={2, 3, 4}, linger=50)
    assert rondo.runner.UPLOAD_RETRIES == 2, "drop_uploads covers the first try's attempts"
    report = run(fake)
    assert report.rejected_uploads == {}
    assert report.rounds_trained == [0, 1, 2]
    assert fake.upload_requests.count((1, "p1")) == 1 + rondo.runner.UPLOAD_RETRIES + 1
    assert fake.downloads.count(1) == 2


def test_a_refused_upload_is_not_sent_again(serve, quick_upload_retries) -> None:
    fake = serve(rounds=1, upload_errors={1: (400, "model_mismatch")})
    report = run(fake)
    assert report.rejected_uploads == {1: "model_mismatch"}
    assert fake.upload_requests.count((1, "p1")) == 1


def bf16_model() -> Weights:
    import ml_dtypes

    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}


def test_a_bf16_model_is_trained_and_sent_back_as_bf16(serve) -> None:
    import ml_dtypes

    fake = serve(rounds=2, round=1, global_model=bf16_model())
    participant = AddOne()
    report = run(fake, participant)
    assert report.rounds_trained == [1, 2] and report.rejected_uploads == {}
    assert participant.seen[0][1]["w"].dtype == ml_dtypes.bfloat16
    assert_weights_equal(fake.uploads[-1].weights, {"w": bf16_model()["w"] + 2})


def test_a_bf16_model_without_ml_dtypes_stops_before_training(serve, monkeypatch) -> None:
    fake = serve(rounds=2, round=1, global_model=bf16_model())
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if it were not installed
    participant = AddOne()
    with pytest.raises(DTypeUnavailable, match=r"'w'.*pip install ml_dtypes"):
        run(fake, participant)
    assert participant.seen == []  # train_round was never called
    assert fake.downloads == [1] and fake.upload_requests == []
