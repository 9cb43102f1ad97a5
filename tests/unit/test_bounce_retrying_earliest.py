"""The earliest time a delay warning's retry can fire is a true lower bound of what `settle`
schedules: a bounce service that comes to the warning before it need not look the job up, and
one that comes after must (the retry may have ended the job)."""

from __future__ import annotations

import random
from dataclasses import replace

from services.bounce.retrying import earliest_retry
from services.core.config import RetryConfig
from services.core.envelope import Attempt, Envelope
from services.core.outcome import Reply
from services.core.schedule import next_attempt_at
from tests.support.relais import an_envelope

SLOW = Reply(451, "4.2.0", "Try again later", "RCPT")
RETRY = RetryConfig(base_delay=60.0, max_delay=3600.0, jitter=0.2, max_age=5 * 86400.0)


def warned_after(attempts: int, received_at: float = 1_000_000.0) -> Envelope:
    """A job as its delay warning carries it: the deferred attempt appended."""
    env = an_envelope("ann@alpha.test", received_at=received_at)
    return replace(env, attempts=tuple(Attempt(received_at + 600.0 * n, SLOW) for n in range(attempts)))


def test_the_earliest_retry_is_the_back_off_with_the_least_jitter() -> None:
    env = warned_after(3)  # third failure: 4 x base_delay, less 20 %
    assert earliest_retry(env, RETRY) == env.attempts[-1].at + 240.0 * 0.8


def test_no_retry_settle_schedules_comes_before_it() -> None:
    for attempts in (1, 2, 5, 9, 20):
        env = warned_after(attempts)
        earliest = earliest_retry(env, RETRY)
        assert earliest is not None
        for seed in range(200):
            at = next_attempt_at(
                env.received_at, env.attempt_count, env.attempts[-1].at, RETRY, random.Random(seed)
            )
            assert at is not None and at >= earliest


def test_the_retry_cut_to_the_maximum_age_is_the_earliest_too() -> None:
    env = warned_after(2, received_at=1_000_000.0)
    near_the_end = replace(RETRY, max_age=600.0 + 30.0)  # 30 s left after the second attempt
    assert earliest_retry(env, near_the_end) == env.received_at + 630.0


def test_a_job_never_attempted_has_no_retry_to_wait_for() -> None:
    assert earliest_retry(an_envelope("ann@alpha.test"), RETRY) is None
