"""What an attempt of a redelivered delivery job already stored, so that its SMTP transaction is
not made a second time.

A worker settles an attempt (`disposition.settle`) before it acks the job, in this order:

1. the retry of its deferred recipients: a schedule on `relais.retry.route.<key>.<round>`
   (publishing the subject again replaces it; msg id `rt-<key>-<round>` when every recipient
   was deferred, else none), after a delay warning (`dw-<key>`);
2. one bounce notice for its bounced, expired and relayed recipients: msg id `bn-<key>-<round>`
   on `relais.bounce`, a work queue the bounce service empties at once;
3. the `delivered` event: msg id `dlv-<key>-<round>`;
4. the body's release, when every recipient is done;

and, once all of that was acknowledged, the `deferred` event (`dfr-<key>-<round>`) in the
background. A worker that dies, or whose ack is lost, after that and before its ack lands has the
job handed to another worker, which used to make the SMTP transaction again: a second copy of
mail the MX had taken.

A job delivered more than once asks first; a first delivery asks nothing (none of its records
can exist), so the hot path costs what it did. JetStream has no index by msg id, but it
remembers every msg id of its duplicate window, which outlasts any redelivery
(`nats.duplicate_window`: twice `ack_wait` and a minute). A publish under a msg id that asks
for a roll-up no stream takes is answered "duplicate" when the id is stored and refused
otherwise, since nats-server de-duplicates before it checks the roll-up; nothing is stored
either way (`msg_id_stored`, tested alone and on a cluster).

What follows from the order: a stored `delivered` event means everything before it was stored
too, and a stored `deferred` event that settle returned. Either way the attempt is settled: the
job is acked without sending (`Stored.complete`). So it is when every recipient was deferred and
the retry's msg id is stored: the retry may have fired before the job came back (a worker that
dies is replaced after `ack_wait`, longer than the first back-off), leaving its subject empty,
and its copy is the job's one live copy. Short of that, the recipients of the attempt's
retry schedule, while it waits, have their outcome; the others are tried again
(`Stored.remaining`): with that retry when no bounce notice was stored (`join_retry`), else at
once, since their failures may be in the notice and a retry would report them a second time.
A redelivery with none of these records is sent again as before: its first copy, if the MX got
one, was in flight.

A job its worker postponed instead (paused, shaped, stopping: `DeliveryService._postpone`) was
re-published as a schedule on `relais.retry.deliver.<key>.<attempts>`, under a msg id of the
job's stream message (`postponement_id`), before the ack. Coming back, it asks that msg id
first (`postponed`): stored, the schedule carries the job on, waiting or fired (its copy is a
new message with a sequence of its own), and the job is acked without acting; acting too would
make two live copies of it. The subject could not tell: a fired schedule is gone from it, and a
later postponement of the job's copy from the schedule is on it too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import nats
from nats.js.api import Header, RawStreamMsg
from nats.js.errors import APIError

from services.core.bus import WRONG_LAST_SEQUENCE, BrokerUnavailable, Bus, leader_last
from services.core.disposition import retry_msg_id
from services.core.envelope import Envelope, EnvelopeDecodeError
from services.core.outcome import NO_ROUTE, Deferred
from services.core.schedule import is_schedule
from services.core.topology import (
    ROUTE_STREAM,
    bounce_subject,
    deliver_retry_subject,
    event_subject,
    route_retry_subject,
)

# Envelope meta of a job that is what is left of a partly settled attempt, when it was
# re-scheduled (paused, shaped) before it went: its next delivery, a first one, asks as well.
PARTLY_SETTLED_META = "partly_settled"

log = logging.getLogger(__name__)

# A roll-up that is no roll-up: a publish asking for it is refused (JSStreamRollupFailedErr,
# "not permitted" on a stream without roll-ups, "invalid" on any other, such as the streams
# that take schedules, on which nats-server always allows roll-ups), and
# nats-server refuses it after the de-duplication, alone and clustered, before it stores or
# stages anything. Expected-last-sequence headers are checked before the de-duplication by a
# server alone, and an unmet expected last msg id leaves a clustered stream holding the msg id.
_NO_ROLLUP = "relais-lookup"
_ROLLUP_FAILED = 10111


@dataclass(frozen=True, slots=True)
class Stored:
    """What is stored of one attempt of a job (its round: `attempt_count + 1`)."""

    # Every recipient has its outcome of this attempt: nothing is left to send.
    complete: bool = False
    # The attempt's retry schedule, not fired yet: its recipients have their outcome.
    retry: RawStreamMsg | None = None
    # The attempt's bounce notice is stored (whose recipients cannot be read back: the bounce
    # service has taken it). A second notice of this attempt would be dropped as its duplicate.
    notice: bool = False
    # This very job message was postponed: its schedule carries the job on, nothing is to be done.
    postponed: bool = False

    @property
    def partly(self) -> bool:
        """Some of the attempt's outcomes are stored, maybe not all."""
        return not self.complete and (self.notice or self.retry is not None)

    def retried(self) -> tuple[str, ...]:
        """The recipients of the attempt's retry schedule, still waiting."""
        if self.retry is None:
            return ()
        try:
            return Envelope.from_msgpack(self.retry.data or b"").recipients
        except EnvelopeDecodeError:
            return ()

    def remaining(self, env: Envelope) -> tuple[str, ...]:
        """The job's recipients without a known stored outcome of this attempt."""
        if self.complete:
            return ()
        retried = set(self.retried())
        return tuple(r for r in env.recipients if r not in retried)

    def kept_deferred(self) -> list[Deferred]:
        """The retry's recipients as outcomes of this attempt, for a second settling of it,
        whose retry schedule replaces the stored one (same subject) and must keep them."""
        if self.retry is None:
            return []
        job = Envelope.from_msgpack(self.retry.data or b"")
        last = job.attempts[-1] if job.attempts else None
        reply = last.reply if last else NO_ROUTE
        return [Deferred(r, reply, last.mx_host if last else "") for r in job.recipients]


NOTHING = Stored()
POSTPONED = Stored(postponed=True)


def postponement_id(key: str, job_seq: int) -> str:
    """The msg id of the schedule that postpones the job delivered as stream message `job_seq`:
    one per postponement, so that postponing the schedule's copy in turn is stored too."""
    return f"pp-{key}-{job_seq}"


async def postponed(bus: Bus, env: Envelope, job_seq: int) -> bool:
    """Whether the job delivered as stream message `job_seq` was postponed (its schedule
    stored, whether it has fired since or not)."""
    subject = deliver_retry_subject(env.key, env.attempt_count)
    return await msg_id_stored(bus, subject, postponement_id(env.key, job_seq))


async def stored_outcome(bus: Bus, env: Envelope) -> Stored:
    """What settle stored of this attempt of `env` before its worker's ack was lost."""
    key, round_no = env.key, env.attempt_count + 1
    if await msg_id_stored(bus, event_subject(env.account, "delivered"), f"dlv-{key}-{round_no}"):
        return Stored(complete=True)
    if await msg_id_stored(bus, event_subject(env.account, "deferred"), f"dfr-{key}-{round_no}"):
        return Stored(complete=True)
    retry_subject = route_retry_subject(key, round_no)
    retry = await leader_last(bus.js, ROUTE_STREAM, retry_subject)
    if retry is not None and not is_schedule(retry.headers):
        # Fired there by a schedule that anyone publishing `relais.route` may store (the router,
        # delivery; the ingress and bounce before they published `relais.submit`): no retry.
        # Taken for one, the job's recipients would count as settled and go unsent.
        retry = None
    if retry is None and await msg_id_stored(bus, retry_subject, retry_msg_id(key, round_no)):
        return Stored(complete=True)  # every recipient was deferred; their retry fired since
    notice = await msg_id_stored(bus, bounce_subject(), f"bn-{key}-{round_no}")
    stored = Stored(retry=retry, notice=notice)
    if retry is not None and not stored.remaining(env):
        return Stored(complete=True)  # every recipient was deferred, and its retry is stored
    return stored if stored.partly else NOTHING


async def join_retry(bus: Bus, retry: RawStreamMsg, recipients: Sequence[str]) -> bool:
    """Add `recipients` to the attempt's retry schedule, at its time; False when it fired
    meanwhile (the publish expects the schedule's own sequence as the subject's last).

    They go with the retry rather than now: settling this attempt a second time would publish
    its retry schedule again, racing the stored one's firing."""
    job = Envelope.from_msgpack(retry.data)
    joined = replace(job, recipients=(*job.recipients, *(r for r in recipients if r not in job.recipients)))
    kept = (Header.SCHEDULE, Header.SCHEDULE_TARGET, "traceparent")
    headers = {h: retry.headers[h] for h in kept if retry.headers and h in retry.headers}
    headers[Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(retry.seq)
    try:
        await bus.publish(retry.subject or "", joined.to_msgpack(), headers=headers)
    except BrokerUnavailable as exc:
        cause = exc.__cause__
        if isinstance(cause, APIError) and cause.err_code in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


async def left_to_send(bus: Bus, env: Envelope, stored: Stored) -> tuple[Envelope, list[Deferred]] | None:
    """The job for the recipients without a stored outcome of a partly settled attempt, and the
    deferrals its settling must keep (those of the attempt's retry, which its own replaces);
    None when they joined that retry instead."""
    remaining = stored.remaining(env)
    kept: list[Deferred] = []
    if stored.retry is not None:
        if not stored.notice and await join_retry(bus, stored.retry, remaining):
            log.info("job %s: %s join the retry of its partly settled attempt", env.key, ",".join(remaining))
            return None
        if stored.notice:
            kept = stored.kept_deferred()
    log.info("job %s: its partly settled attempt is made again for %s", env.key, ",".join(remaining))
    # Re-scheduled before it goes (paused, shaped), the rest still asks at its next delivery.
    left = replace(env, recipients=remaining, meta={**env.meta, PARTLY_SETTLED_META: "1"})
    return left, kept


def unmarked(env: Envelope) -> Envelope:
    """The job as its outcomes record it: without the mark of a partly settled attempt (its
    retry is an attempt like any other)."""
    if PARTLY_SETTLED_META not in env.meta:
        return env
    return replace(env, meta={k: v for k, v in env.meta.items() if k != PARTLY_SETTLED_META})


async def msg_id_stored(bus: Bus, subject: str, msg_id: str) -> bool:
    """Whether a message is stored under `msg_id` on `subject`'s stream (within the duplicate
    window); stores nothing."""
    headers = {Header.MSG_ID: msg_id, Header.ROLLUP: _NO_ROLLUP}
    try:
        ack = await bus.js.publish(subject, b"", timeout=bus.publish_timeout, headers=headers)
    except APIError as exc:
        if exc.err_code == _ROLLUP_FAILED:
            return False
        raise BrokerUnavailable(f"looking up {msg_id} failed: {exc!r}") from exc
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise BrokerUnavailable(f"looking up {msg_id} failed: {exc!r}") from exc
    if not ack.duplicate:
        # A server that does not check the msg id first stored the empty probe, and the outcome
        # it stands for would be dropped as its duplicate. Never done by nats-server 2.12+.
        log.error("looking up %s stored an empty message (%s seq %d)", msg_id, ack.stream, ack.seq)
        raise BrokerUnavailable(f"looking up {msg_id} stored it")
    return True
