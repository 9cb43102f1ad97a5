"""Retry arithmetic for jobs retried many times: a fixed interval (base_delay = max_delay) for
days passes a thousand attempts, and each deferral must still get a retry time or expire."""

from __future__ import annotations

from services.core.config import RetryConfig
from services.core.schedule import backoff_delay, next_attempt_at

# Postfix-like: every 5 minutes, for 5 days (1,440 attempts).
FIXED = RetryConfig(base_delay=300.0, max_delay=300.0, jitter=0.0, max_age=5 * 86400.0)


def test_the_thousandth_retry_waits_max_delay() -> None:
    assert [backoff_delay(n, FIXED) for n in (1, 1024, 1025, 1439, 10**6)] == [300.0] * 5


def test_a_job_retried_for_days_still_gets_a_retry_time_then_expires() -> None:
    received = 1_000_000.0
    now = received + 1100 * 300.0
    assert next_attempt_at(received, 1100, now, FIXED) == now + 300.0
    deadline = received + FIXED.max_age
    assert next_attempt_at(received, 1440, deadline - 100, FIXED) == deadline  # the last attempt
    assert next_attempt_at(received, 1441, deadline, FIXED) is None
