"""Deferred mail, by site: `relais requeue` (try now) and `relais bounce-queue` (give up, with a DSN).

A deferred job is a JetStream schedule message on `relais.retry.<stage>.<key>.<n>` carrying the
whole envelope (see `services.core.schedule`). Both commands read those schedules directly from
the streams (message get by subject, no consumer), act on the ones whose envelope is for the
site, and only then delete the schedule:

- requeue publishes the envelope to the schedule's own target subject now, keeping its
  traceparent header, so the retry joins the message's trace like a fired schedule would;
- bounce-queue publishes a BounceNotice with an administrative 5.0.0 reply; the bounce service
  sends the DSN, records `bounced` events and releases the body.

The server may fire a schedule while a command is working on it, so each job is first taken
over by replacing its schedule with one that expects the sequence the command read
(`Nats-Expected-Last-Subject-Sequence`). A schedule that fired, or that another command replaced,
fails that check and is skipped: it is never acted on twice.

- requeue's replacement is simply due now: the server fires it, as it would have later;
- bounce-queue's is due an hour later than the job was (a claim), then the BounceNotice is
  published, then the claim is marked as noticed (replaced once more) and deleted. A command
  that dies after the claim leaves the job to be retried an hour late, never a lost message;
  one that dies between the notice and the delete leaves that retry after the bounce.
  A claim says so in a header, and requeue leaves it alone: taken over, it would fire at once,
  and the job be delivered after its sender was told it bounced.
- bounce-queue run again finishes what a failed run left: a claim marked as noticed is only
  deleted. A claim without the mark may belong to a run that died between its notice's ack
  and the mark, so the rerun looks for that notice where it must be if it was published (in
  the bounce stream, or, once the bounce service handled it, as its `bounced` events; both
  read from near the claim's time) and only deletes the claim when it finds it; otherwise the
  job is bounced like a deferred one. The notice's msg id is the job's and attempt's, so the
  notice of a run racing another over the same claim is dropped by JetStream (within its
  duplicate window, `nats.duplicate_window`); a rerun, however late while the claim stands,
  sends no second notice, so no second DSN or `bounced` event. The look-up costs a rerun a
  scan of the bounce stream near the claim's time and of the account's `bounced` events since.

Schedules fire by the servers' clock, and this host's may be hours off it (a clock set to local
time read as UTC). So "now" is when the server stored the schedule, in its past, and the claim is
due an hour after the job was (a time in the server's future: it has not fired), or after now by
this host's clock if that is later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, Header, RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from services.core import telemetry as t
from services.core.addresses import domain_key
from services.core.bus import WRONG_LAST_SEQUENCE, Bus
from services.core.envelope import Attempt, BounceNotice, Envelope, EnvelopeDecodeError
from services.core.events import Event
from services.core.outcome import ADMIN_STAGE, Bounced, Reply
from services.core.schedule import parse_at, rfc3339
from services.core.sites import site_of_host
from services.core.topology import (
    BOUNCE_STREAM,
    DELIVER_STREAM,
    EVENTS_STREAM,
    bounce_subject,
    deliver_filter,
    event_subject,
    retry_filters,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Scheduled:
    stream: str
    seq: int
    subject: str
    target: str
    headers: dict[str, str]
    envelope: Envelope
    due: float | None = None  # when the schedule fires, by the server's clock
    stored_at: float | None = None  # when the server stored it, by its clock: in its past


def admin_bounce_reply(reason: str) -> Reply:
    return Reply(550, "5.0.0", f"Bounced by the administrator: {reason or 'no reason given'}", ADMIN_STAGE)


_EVERY_SITE = ("*", "all")


def matches_site(env: Envelope, site: str) -> bool:
    """`site` names the job's site as the router named it (a `[sites]` rule's name, else the
    registrable part of the primary MX host; `relais status` lists them) or its recipient domain
    (the only name of a job deferred before MX resolution); in any spelling (case, trailing dot,
    U-labels): the router stores A-labels. Never an MX host: one serves many domains, and a host
    name may be a recipient domain as well. An empty name is no site: jobs deferred before MX
    resolution have none, and it would match them all."""
    site = domain_key(site)
    if not site:
        return False
    return site in _EVERY_SITE or site in (domain_key(env.site), domain_key(env.domain))


def unmatched_hint(site: str) -> str:
    """What to tell an operator whose `site` matched no deferred job ("" for every site): what it
    is matched against, and, for a name that can only be an MX host's, the site its mail is in
    (`relais pause site` refuses such a name by the same rule). Nothing to do is no failure, as
    `postqueue -s` says nothing for a destination without mail, but `requeue mx1.example.test`
    finding nothing must not read as "nothing deferred there"."""
    name = domain_key(site)
    if name in _EVERY_SITE:
        return ""
    hint = (
        f"{site} is matched against the site names the router gives (as `relais status` lists them) and"
        " recipient domains, never MX hosts"
    )
    host_site = site_of_host(name)
    if host_site is not None:
        hint += f"; mail through the MX host {name} is in site {host_site}, unless a [sites] rule names it"
    return hint


async def _stored(
    bus: Bus, stream: str, subject_filter: str, limit: int
) -> AsyncIterator[tuple[RawStreamMsg, Envelope]]:
    """The envelopes stored on a subject filter, in sequence order (message get, no consumer),
    up to the stream's last message when the scan began: a schedule that requeue replaces is
    stored again further on, and must not be found a second time."""
    last = (await bus.js.stream_info(stream)).state.last_seq
    seq = 1
    for _ in range(limit):
        try:
            raw = await bus.js.get_msg(stream, seq=seq, subject=subject_filter, next=True)
        except NotFoundError:
            return
        if (raw.seq or 0) > last:
            return
        seq = (raw.seq or seq) + 1
        try:
            env = Envelope.from_msgpack(raw.data or b"")
        except EnvelopeDecodeError:
            continue
        yield raw, env


async def scheduled_jobs(bus: Bus, limit: int = 1_000_000) -> AsyncIterator[Scheduled]:
    """Every retry schedule currently stored, stream by stream, in sequence order."""
    for stream, subject_filter in retry_filters():
        async for raw, env in _stored(bus, stream, subject_filter, limit):
            headers = dict(raw.headers or {})
            target = headers.get(Header.SCHEDULE_TARGET, "")
            if target:
                due = parse_at(headers.get(Header.SCHEDULE, ""))
                stored_at = raw.time.timestamp() if raw.time else None
                yield Scheduled(stream, raw.seq or 0, raw.subject or "", target, headers, env, due, stored_at)


async def queued_jobs(bus: Bus, limit: int = 1_000_000) -> AsyncIterator[Envelope]:
    """Delivery jobs waiting for a delivery worker or in one's hands now; deferred ones are not
    here but in `scheduled_jobs`."""
    async for _, env in _stored(bus, DELIVER_STREAM, deliver_filter(), limit):
        yield env


# Marks a schedule that a bounce-queue run claimed: its job is being bounced.
_CLAIMED_BY = "Relais-Claimed-By"
# Marks a claim whose BounceNotice is out (its msg id): a rerun only deletes it.
_NOTICED = "Relais-Noticed"
_MARKS = (_CLAIMED_BY, _NOTICED)


def _carried_headers(headers: dict[str, str]) -> dict[str, str]:
    # The trace context travels on; the schedule's own NATS-* headers and a claim's marks must not.
    return {k: v for k, v in headers.items() if not k.lower().startswith("nats-") and k not in _MARKS}


def admin_notice_id(env: Envelope) -> str:
    """The msg id of bounce-queue's notice for a job: the same in every run that bounces this
    attempt of the job, so JetStream keeps one."""
    return f"bn-admin-{env.key}-{env.attempt_count}"


# Long enough for a bounce-queue run to publish its notice and delete the claim.
_CLAIM_FOR = 3600.0
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# JSStreamMsgDeleteFailed ("no message found"): the sequence is not (or no longer) stored.
_NO_MESSAGE = 10057


async def _take_over(
    bus: Bus, job: Scheduled, at: float, *, claim: bool = False, noticed: str = ""
) -> int | None:
    """Replace the job's schedule with one due at `at`, if it is still the one read; returns
    the new schedule's sequence, or None when it fired or was replaced meanwhile. `claim`
    marks the replacement as bounce-queue's, `noticed` as one whose notice is out."""
    headers = _carried_headers(job.headers)
    headers |= {
        Header.SCHEDULE: f"@at {rfc3339(at)}",
        Header.SCHEDULE_TARGET: job.target,
        _EXPECTED_LAST_SUBJECT_SEQ: str(job.seq),
    }
    if claim:
        headers[_CLAIMED_BY] = "bounce-queue"
    if noticed:
        headers[_NOTICED] = noticed
    try:
        ack = await bus.js.publish(job.subject, job.envelope.to_msgpack(), headers=headers)
    except APIError as exc:
        if exc.err_code in WRONG_LAST_SEQUENCE:
            return None
        raise
    return ack.seq


async def _delete_claim(bus: Bus, stream: str, seq: int) -> None:
    """Delete a claim whose notice is out, patiently: left, it would send the bounced job an
    hour later, a second outcome."""
    for attempt in range(30):
        try:
            await bus.js.delete_msg(stream, seq)
            return
        except NotFoundError:
            return
        except Exception as exc:
            if isinstance(exc, APIError) and exc.err_code == _NO_MESSAGE:
                return  # gone already: an earlier try whose answer was lost deleted it
            if attempt == 29:
                raise
            log.warning("deleting claim %s/%d failed, trying again: %r", stream, seq, exc)
            await asyncio.sleep(1.0)


async def requeue(bus: Bus, site: str) -> list[Scheduled]:
    """Retry every deferred job for the site now; returns the jobs that were requeued. Jobs a
    bounce-queue run has claimed are left to it."""
    done: list[Scheduled] = []
    async for job in scheduled_jobs(bus):
        if _CLAIMED_BY in job.headers or not matches_site(job.envelope, site):
            continue
        now = job.stored_at if job.stored_at is not None else time.time()
        if await _take_over(bus, job, now) is not None:
            done.append(job)
    return done


async def bounce_queue(bus: Bus, site: str, reason: str) -> list[Scheduled]:
    """Bounce every deferred job for the site with an administrative reply (DSNs follow)."""
    reply = admin_bounce_reply(reason)
    done: list[Scheduled] = []
    async for job in scheduled_jobs(bus):
        if not matches_site(job.envelope, site):
            continue
        if job.headers.get(_NOTICED) or (_CLAIMED_BY in job.headers and await _notice_out(bus, job)):
            # An earlier run's notice is out and only its claim is left.
            await _delete_claim(bus, job.stream, job.seq)
            done.append(job)
        elif await _bounce_job(bus, job, reply):
            done.append(job)
    return done


async def _bounce_job(bus: Bus, job: Scheduled, reply: Reply) -> bool:
    """Claim the job, publish its notice, mark the claim noticed and delete it; False when the
    job fired or another run took it over meanwhile."""
    due = max(time.time(), job.due or 0.0) + _CLAIM_FOR
    claim = await _take_over(bus, job, due, claim=True)
    if claim is None:
        return False
    env = job.envelope
    notice = BounceNotice(
        envelope=env.with_attempt(Attempt(time.time(), reply)),
        failures=tuple(Bounced(rcpt, reply) for rcpt in env.recipients),
        releases_body=True,
    )
    msg_id = admin_notice_id(env)
    await _publish_notice(bus, job, notice, msg_id)
    # Marked before the delete, which retries for a while: a run that dies there leaves a claim
    # that a rerun, however much later, deletes without a second notice.
    marked = await _take_over(bus, replace(job, seq=claim), due, claim=True, noticed=msg_id)
    if marked is not None:
        await _delete_claim(bus, job.stream, marked)
    # else another run took the claim over meanwhile: its notice has this msg id, and it deletes.
    return True


async def _publish_notice(bus: Bus, job: Scheduled, notice: BounceNotice, msg_id: str) -> None:
    env = job.envelope
    await bus.publish(
        bounce_subject(),
        notice.to_msgpack(),
        msg_id=msg_id,
        headers=_carried_headers(job.headers),
        attributes={t.MESSAGE_ID: env.id, t.SITE: env.site},
    )


# How far from its claim's storage a run's notice can be stored: published right after the claim
# and given up after the publish timeout, plus the skew between the two streams' leaders' clocks.
_NOTICE_NEAR_CLAIM = 300.0
# A scan of the events stream that has some to read gives up after this long without one.
_EVENTS_IDLE = 10.0


async def _notice_out(bus: Bus, claim: Scheduled) -> bool:
    """Whether the run that claimed this job published its notice before it died unmarked.

    Looked for where the notice is: in the bounce stream until the bounce service has handled
    it, then as the `bounced` events it publishes before it acks the notice (the stream is a
    work queue, the notice then gone). Read in that order, a notice handled between the two
    reads is seen in the second. Both scans start near the claim's time: a rerun must not send a
    second notice once JetStream forgot the msg id (its duplicate window), nor skip one that
    was never stored."""
    since = (claim.stored_at or 0.0) - _NOTICE_NEAR_CLAIM
    if await _in_bounce_stream(bus, admin_notice_id(claim.envelope), since):
        return True
    return await _bounced_events_out(bus, claim.envelope, since)


async def _in_bounce_stream(bus: Bus, msg_id: str, since: float) -> bool:
    seq = await _first_stored_since(bus, BOUNCE_STREAM, bounce_subject(), since)
    until = since + 2 * _NOTICE_NEAR_CLAIM
    while True:
        try:
            raw = await bus.js.get_msg(BOUNCE_STREAM, seq=seq, subject=bounce_subject(), next=True)
        except NotFoundError:
            return False
        if _stored_at(raw) > until:
            return False
        if (raw.headers or {}).get(Header.MSG_ID) == msg_id:
            return True
        seq = (raw.seq or seq) + 1


async def _first_stored_since(bus: Bus, stream: str, subject: str, since: float) -> int:
    """A sequence from which the stream's next message on `subject` is the first stored at
    `since` or later (binary search: the stream may hold a long backlog from before)."""
    state = (await bus.js.stream_info(stream)).state
    low, high = state.first_seq, state.last_seq + 1
    while low < high:
        middle = (low + high) // 2
        try:
            raw = await bus.js.get_msg(stream, seq=middle, subject=subject, next=True)
        except NotFoundError:
            high = middle
            continue
        if _stored_at(raw) < since:
            low = (raw.seq or middle) + 1
        else:
            high = middle
    return low


def _stored_at(raw: RawStreamMsg) -> float:
    return raw.time.timestamp() if raw.time else 0.0


async def _bounced_events_out(bus: Bus, env: Envelope, since: float) -> bool:
    """Whether the bounce service recorded a `bounced` event of bounce-queue's notice for this
    attempt of the job: the notice's attempt is the one after the job's."""
    start = datetime.fromtimestamp(max(0.0, since), UTC)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
    sub = await bus.js.subscribe(
        event_subject(env.account, "bounced"), stream=EVENTS_STREAM, ordered_consumer=True, config=config
    )
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and info.delivered.consumer_seq == 0:
            return False  # no such event since then: none to wait for
        while True:
            try:
                msg = await sub.next_msg(timeout=_EVENTS_IDLE)
            except (TimeoutError, nats.errors.TimeoutError):
                return False
            try:
                event = Event.from_json(msg.data)
            except (ValueError, TypeError):
                continue
            if (event.message_id, event.job_id, event.attempt) == (env.id, env.job_id, env.attempt_count + 1):
                return True
            if msg.metadata and msg.metadata.num_pending == 0:
                return False
    finally:
        await sub.unsubscribe()


@dataclass
class BySite:
    """Recipients per site from one scan (for `relais status`); `held`: those of jobs a pause
    holds, counted there instead; `truncated`: the scan hit its limit."""

    sites: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    truncated: bool = False


# (pool, site) -> whether a pause holds such a job now (`services.core.pause.holding`).
Holds = Callable[[str, str], bool]


def _nothing_paused(pool: str, site: str) -> bool:
    return False


async def deferred_by_site(bus: Bus, limit: int = 100_000, holds: Holds = _nothing_paused) -> BySite:
    """Deferred recipients per site. A job a worker postponed (a schedule in the delivery stream,
    back to its pool's queue) is held when a pause holds it: it waits for the resume, not for a
    retry. A deferred job's retry (in the route stream) waits for its time whatever is paused."""
    jobs = (
        (job.envelope, job.stream == DELIVER_STREAM and holds(job.envelope.pool, job.envelope.site))
        async for job in scheduled_jobs(bus, limit + 1)
    )
    return await _recipients_by_site(jobs, limit)


async def queued_by_site(bus: Bus, limit: int = 100_000, holds: Holds = _nothing_paused) -> BySite:
    """Recipients queued for delivery now, per site: where a backlog is (Postfix's qshape); those
    of a paused pool or site apart, as held."""
    return await _recipients_by_site(
        ((env, holds(env.pool, env.site)) async for env in queued_jobs(bus, limit + 1)), limit
    )


async def _recipients_by_site(jobs: AsyncIterator[tuple[Envelope, bool]], limit: int) -> BySite:
    counts = BySite()
    seen = 0
    async for env, held in jobs:
        seen += 1
        if seen > limit:
            counts.truncated = True
            return counts
        # Jobs deferred before MX resolution have no site yet: their domain stands in.
        site = env.site or env.domain or "?"
        into = counts.held if held else counts.sites
        into[site] = into.get(site, 0) + len(env.recipients)
    return counts
