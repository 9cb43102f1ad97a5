"""Backoff and expiry arithmetic for retries."""

from __future__ import annotations

import random

from services.core.config import RetryConfig
from services.core.schedule import backoff_delay, next_attempt_at, rfc3339

CFG = RetryConfig(base_delay=60.0, max_delay=3600.0, jitter=0.2, max_age=5 * 86400.0)


def test_backoff_doubles_and_caps() -> None:
    exact = RetryConfig(base_delay=60.0, max_delay=3600.0, jitter=0.0, max_age=1e9)
    assert [backoff_delay(n, exact) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_jitter_stays_within_bounds_and_spreads() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(1, CFG, rng) for _ in range(500)]
    assert min(delays) >= 48 and max(delays) <= 72
    assert len({round(d) for d in delays}) > 10, "jitter spreads retries so they do not stampede"


def test_first_retry_is_within_minutes() -> None:
    assert backoff_delay(1, RetryConfig()) <= 5 * 60


def test_no_retry_past_max_age() -> None:
    received = 1_000_000.0
    assert next_attempt_at(received, 1, received + 10, CFG) is not None
    assert next_attempt_at(received, 20, received + CFG.max_age, CFG) is None
    assert next_attempt_at(received, 20, received + CFG.max_age + 60, CFG) is None


def test_the_last_attempt_comes_when_the_message_is_max_age_old() -> None:
    # The back-off from here would pass max_age: the retry is cut to it rather than dropped, so
    # no message expires before max_age (it did up to max_delay * (1 + jitter) early).
    received = 1_000_000.0
    now = received + CFG.max_age - 60
    assert next_attempt_at(received, 20, now, CFG) == received + CFG.max_age


def test_rfc3339_rounds_up_to_whole_seconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
    assert rfc3339(0.2) == "1970-01-01T00:00:01Z"
