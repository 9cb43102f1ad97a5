"""The one-shot schedule header is read back as `rfc3339` writes it: the admin commands take a
deferred job's due time from it, by the servers' clock rather than their own."""

from __future__ import annotations

from services.core.schedule import parse_at, rfc3339


def test_an_at_schedule_reads_back_as_written() -> None:
    assert parse_at(f"@at {rfc3339(1_796_290_765.0)}") == 1_796_290_765.0
    assert parse_at("@at 2026-12-03T11:37:20+01:00") == 1_796_297_840.0 - 3600


def test_other_schedules_have_no_time() -> None:
    assert parse_at("@every 5m") is None
    assert parse_at("") is None
    assert parse_at("@at tomorrow") is None
    assert parse_at("@at 2026-12-03T11:37:20") is None  # no zone: no instant
