from __future__ import annotations

import pytest

from rondo import ParticipantReport
from rondo.util import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512B", 512),
        ("512", 512),
        ("1kB", 1000),
        ("1KB", 1000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("1KiB", 1024),
        ("1GiB", 1 << 30),
        ("2 MiB", 2 << 20),
        ("1.5MB", 1_500_000),
        ("0.1MB", 100_000),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "10XB", "1e3", "ten", "1.2.3kB", "10 M B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_report_defaults_are_independent() -> None:
    a, b = ParticipantReport(), ParticipantReport()
    a.rounds_trained.append(1)
    a.rejected_uploads[2] = "token_expired"
    assert b == ParticipantReport()
    assert b.rounds_trained == [] and b.evaluated == [] and b.rejected_uploads == {}
    assert a.final_action is None


def test_backoff_doubles_with_jitter_up_to_the_cap_and_stops_after_its_attempts() -> None:
    from rondo.util import Backoff

    backoff = Backoff(0.1, 0.4, attempts=4)
    delays = [backoff.next_delay() for _ in range(5)]
    assert delays[4] is None
    for delay, step in zip(delays[:4], [0.1, 0.2, 0.4, 0.4], strict=True):
        assert delay is not None and step / 2 <= delay <= step
    assert len({Backoff(1.0, 1.0).next_delay() for _ in range(20)}) > 1, "jittered"
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
