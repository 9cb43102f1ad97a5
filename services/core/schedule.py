"""Retries that never sit in a consumer's ack-pending window.

A deferred job is re-published as a JetStream message schedule (ADR-51, nats-server 2.12+):
the schedule message lives on its own subject (`relais.retry.<stage>.<key>.<n>`) with
`Nats-Schedule: @at <time>` and `Nats-Schedule-Target: <work subject>`; at that time the server
publishes it to the work subject and purges the schedule. The consumer acks the original as soon
as the schedule is stored, so thousands of deferred messages cost no consumer capacity.

The server publishes what a schedule fires itself, to any subject of the schedule's stream: it
checks the target against the stream's subjects, not against its publisher's permissions. A
service user may so reach a subject of that stream it may not publish (delivery the router's
verdicts, the ingress a job's retry subject). What it fires is inert, though, and marked: the
server strips the schedule's headers and sets `Nats-Scheduler`, which it refuses from clients.
So the readers of such a subject tell it apart (`fired_by`, `is_schedule`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime

from nats.js.api import Header

from services.core.bus import Bus
from services.core.config import RetryConfig

# Doublings past which every delay is the cap anyway. A job retried at a fixed interval
# (base_delay = max_delay) for days reaches 1,025 attempts, and 2 ** 1024 overflows a float: its
# outcome could then never be settled, and the job was attempted again and again, never expiring.
_MAX_DOUBLINGS = 60


def doubling(base: float, failures: int, cap: float) -> float:
    """base, 2*base, 4*base ... after the 1st, 2nd, 3rd ... failure, never above `cap`, for any
    number of failures."""
    return min(base * 2.0 ** min(max(0, failures - 1), _MAX_DOUBLINGS), cap)


def backoff_delay(failures: int, config: RetryConfig, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-jitter: base, 2*base, 4*base ... capped at max_delay."""
    rng = rng or random.Random()
    raw = doubling(config.base_delay, failures, config.max_delay)
    return max(1.0, raw * (1 + rng.uniform(-config.jitter, config.jitter)))


def next_attempt_at(
    received_at: float, failures: int, now: float, config: RetryConfig, rng: random.Random | None = None
) -> float | None:
    """When to try again, or None once the message is max_age old (it expires).

    A back-off that would pass max_age is cut to it: the last attempt comes when the message is
    max_age old, so mail is tried for as long as max_age says, as with Postfix's
    maximal_queue_lifetime, instead of expiring up to max_delay early."""
    deadline = received_at + config.max_age
    if now >= deadline:
        return None
    return min(now + backoff_delay(failures, config, rng), deadline)


def fired_by(headers: Mapping[str, str] | None) -> str:
    """The subject of the schedule that fired this message; "" for one a client published."""
    return (headers or {}).get(Header.SCHEDULER.value, "")


def is_schedule(headers: Mapping[str, str] | None) -> bool:
    """Whether a stored message is a schedule still to fire (a retry to come), not what one
    fired into its subject."""
    return bool((headers or {}).get(Header.SCHEDULE.value)) and not fired_by(headers)


def rfc3339(ts: float) -> str:
    # Whole seconds: the server's @at parser takes RFC 3339 without fractional seconds.
    return datetime.fromtimestamp(int(ts) + (1 if ts % 1 else 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_at(schedule: str) -> float | None:
    """The time of a one-shot schedule header (`@at <RFC 3339>`), None for any other schedule."""
    kind, _, when = schedule.strip().partition(" ")
    if kind != "@at":
        return None
    try:
        at = datetime.fromisoformat(when.strip())
    except ValueError:
        return None
    return at.timestamp() if at.tzinfo is not None else None


async def publish_at(
    bus: Bus,
    *,
    schedule_subject: str,
    target_subject: str,
    payload: bytes,
    at: float,
    headers: Mapping[str, str] | None = None,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """Store a one-shot schedule. Re-publishing the same schedule subject replaces it, so a
    redelivered consumer that schedules again does not create a second retry."""
    hdrs = dict(headers or {})
    hdrs[Header.SCHEDULE] = f"@at {rfc3339(at)}"
    hdrs[Header.SCHEDULE_TARGET] = target_subject
    await bus.publish(schedule_subject, payload, headers=hdrs, attributes=attributes)
