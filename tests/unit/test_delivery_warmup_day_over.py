"""Delivery holds back a job that warm-up counted for a UTC day that is over (the
integration side, with the retry counted again, is tests/integration/router/
test_warmup_day_over_before_sending.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.core.envelope import META_SOURCE, META_WARMUP_DAY
from services.delivery.service import counted_for_a_day_over
from tests.support.relais import an_envelope

JUST_AFTER_MIDNIGHT = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC).timestamp()


def _pinned(day: str | None):
    meta = {META_SOURCE: "127.0.0.5"} | ({META_WARMUP_DAY: day} if day is not None else {})
    return an_envelope("a@alpha.test", meta=meta)


def test_a_job_counted_yesterday_waits() -> None:
    assert counted_for_a_day_over(_pinned("2026-12-01"), JUST_AFTER_MIDNIGHT)
    assert counted_for_a_day_over(_pinned("2026-11-30"), JUST_AFTER_MIDNIGHT)


def test_a_job_counted_today_or_by_a_clock_ahead_goes() -> None:
    assert not counted_for_a_day_over(_pinned("2026-12-02"), JUST_AFTER_MIDNIGHT)
    assert not counted_for_a_day_over(_pinned("2026-12-03"), JUST_AFTER_MIDNIGHT)


def test_a_job_pinned_by_a_previous_release_or_not_at_all_goes() -> None:
    assert not counted_for_a_day_over(_pinned(None), JUST_AFTER_MIDNIGHT)
    assert not counted_for_a_day_over(an_envelope("a@alpha.test"), JUST_AFTER_MIDNIGHT)
