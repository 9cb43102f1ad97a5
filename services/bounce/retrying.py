"""Whether a delay warning still tells the truth when its DSN is built.

`settle` sends a job's delay warning ("still trying", RFC 3464 action delayed) together with the
retry it announces. The bounce service may come to it much later: a backlog on `relais.bounce`,
a replica down, a flush that fires into a stopped service. By then the retry may have run and
its recipients have their final outcome: delivered, or failed with a DSN of their own, which
can even reach the sender first. A sender must not hear "still trying" after that.

Nothing records a recipient's final outcome where it can be looked up by job: events are kept
per account and kind, a failure's notice waits in a work queue among everyone's, and most bodies
travel inline, holding no references. What can be looked up cheaply is the opposite, a pending
retry: its schedule is stored on a subject of its own job (one message get per stream). So a
warned recipient is still being retried, and stays in the warning, when

- the retry announced with the warning cannot have fired yet: the earliest time the back-off
  allows (least jitter) is still ahead. This is the usual case, a warning handled seconds after
  it was sent, and it needs no look-up (the warning is published just before its retry's
  schedule, so a look-up could miss a schedule not stored yet); or
- a retry schedule of its job holds it (a route or delivery retry, of any later round, or a
  `relais bounce-queue` claim, whose notice then follows the warning).

Every other warned recipient is left out, and a warning left with none is not sent. That also
leaves out a recipient whose retry fired and whose attempt has not settled yet (routed, queued
for delivery, in an SMTP session): it cannot be told from one that settled, and a missing
courtesy warning, followed by the message's real outcome, is the lesser harm than a warning
that contradicts it. Only a backlog longer than the back-off gets that far.
"""

from __future__ import annotations

import random
from dataclasses import replace

from nats.js import JetStreamContext

from services.core.bus import leader_last
from services.core.config import RetryConfig
from services.core.envelope import BounceNotice, Envelope, EnvelopeDecodeError
from services.core.schedule import is_schedule, next_attempt_at
from services.core.topology import job_retry_filters


class _LeastJitter(random.Random):
    """Draws the lowest jitter, so the back-off is the shortest `settle` could have chosen."""

    def uniform(self, a: float, b: float) -> float:
        return a


def earliest_retry(env: Envelope, retry: RetryConfig) -> float | None:
    """The earliest time the retry that `settle` scheduled with this attempt of a job can fire
    (`env` as in its delay warning: the attempt appended); None when there was none to have."""
    if not env.attempts:
        return None
    return next_attempt_at(env.received_at, env.attempt_count, env.attempts[-1].at, retry, _LeastJitter())


async def pending_recipients(js: JetStreamContext, key: str) -> set[str] | None:
    """The recipients of the job's stored retry schedules; None when one cannot be read (a later
    release's): the job is still being retried, and every recipient counts."""
    pending: set[str] = set()
    for stream, subject_filter in job_retry_filters(key):
        stored = await leader_last(js, stream, subject_filter)
        if stored is None or not is_schedule(stored.headers):
            continue  # none, or fired into the subject by a schedule of another subject: no retry
        try:
            pending.update(Envelope.from_msgpack(stored.data or b"").recipients)
        except EnvelopeDecodeError:
            return None
    return pending


async def still_retried(
    js: JetStreamContext, notice: BounceNotice, retry: RetryConfig, now: float
) -> BounceNotice | None:
    """The delay warning with only the recipients still being retried; None when none is."""
    env = notice.envelope
    earliest = earliest_retry(env, retry)
    if earliest is not None and now < earliest:
        return notice
    pending = await pending_recipients(js, env.key)
    if pending is None:
        return notice
    kept = tuple(f for f in notice.failures if f.recipient in pending)
    if not kept:
        return None
    return notice if len(kept) == len(notice.failures) else replace(notice, failures=kept)
