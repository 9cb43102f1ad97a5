"""Turn one attempt's per-recipient outcomes into durable next steps.

Shared by the router (DNS outcomes) and delivery (SMTP outcomes), so a message's fate follows
the same rules wherever it was decided:

- delivered recipients: a `delivered` event;
- deferred recipients: one scheduled retry of the job restricted to them, or, past the maximum
  queue age, expiry (4.4.7) which joins the bounced ones;
- bounced recipients, and delivered ones whose NOTIFY asked for SUCCESS: one `BounceNotice`
  for the bounce service (DSN, then body release);
- when nothing is left pending, the job's body reference is released here, after the
  `delivered` event; by the notice when no recipient was delivered.

Everything is published (and acknowledged) before the caller acks its input, except the
`deferred` event: it reports a retry that is already stored, so it goes out in the background
(`events.report_later`: asked again through a leader election, awaited when the service stops).
Its span event is added in line, once every other consequence was acknowledged, since the
background publish runs after the attempt's span ended; it is counted and logged by that
publish, unless JetStream already held it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace

from nats.js.api import Header

from services.core.bodies import BodyStore
from services.core.bus import BrokerUnavailable, Bus, patiently
from services.core.config import Config, RetryConfig
from services.core.envelope import Attempt, BounceNotice, Envelope, dsn_recipients, wants_dsn
from services.core.events import Event, annotate_event, event_for, publish_event, report_later
from services.core.outcome import EXPIRED, Bounced, Deferred, Delivered, Outcome, Reply
from services.core.schedule import next_attempt_at, publish_at
from services.core.topology import body_ttl, bounce_subject, route_retry_subject, route_subject

log = logging.getLogger(__name__)

# Envelope meta key set once the delayed-delivery warning went out, so it goes out once.
DELAY_WARNED = "delay_warned"


def retry_msg_id(key: str, round_no: int) -> str:
    """The msg id of the retry schedule of an attempt whose every recipient was deferred."""
    return f"rt-{key}-{round_no}"


def wants_delay_warning(env: Envelope, retry: RetryConfig, now: float) -> bool:
    """Whether this deferral is the first one past `retry.delay_warning_after` (0 = never)."""
    return (
        retry.delay_warning_after > 0
        and wants_dsn(env)
        and now - env.received_at >= retry.delay_warning_after
        and env.meta.get(DELAY_WARNED) != "1"
    )


def expiry_reply(last: Reply) -> Reply:
    return Reply(EXPIRED.code, EXPIRED.enhanced_status, f"{EXPIRED.text}; last reply: {last}", last.command)


# The "last reply" of an expiry whose job was never tried before its body went by TTL.
BODY_EXPIRED = Reply(451, "4.4.7", "Message content expired from the queue before it could be sent", "QUEUE")


async def settle_missing_body(
    bus: Bus, bodies: BodyStore, config: Config, env: Envelope, *, now: float | None = None
) -> None:
    """What a job whose stored body is gone (`BodyMissing`) comes to.

    Mostly a redelivery after the job's final outcome released the body: dropped, or the
    message would get a second outcome. But a body also goes by the Object Store's TTL
    (`body_ttl`): a job received that long ago cannot be such a redelivery (every job ends by
    `retry.max_age`, a redelivery follows within minutes), so its recipients expire, as a job
    past its queue age does, lest the message end with no outcome and its sender unaware."""
    decided_at = time.time() if now is None else now
    if decided_at - env.received_at < body_ttl(config):
        log.info("job %s already finished; dropping redelivery", env.key)
        return
    log.warning(
        "job %s expires: its body went by TTL (%.0f s) before it could be sent", env.key, body_ttl(config)
    )
    last = env.attempts[-1].reply if env.attempts else BODY_EXPIRED
    expired = [Bounced(rcpt, expiry_reply(last), expired=True) for rcpt in env.recipients]
    await settle(bus, bodies, config.retry, env, expired, now=decided_at)


async def settle(
    bus: Bus,
    bodies: BodyStore,
    retry: RetryConfig,
    env: Envelope,
    outcomes: Sequence[Outcome],
    *,
    mx_host: str = "",
    source_ip: str = "",
    now: float | None = None,
    rng: random.Random | None = None,
    facts: Mapping[str, object] | None = None,
    retry_stored: bool = False,
    notice_stored: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Publish every consequence of one attempt (`_settle_once`), again while JetStream does
    not acknowledge (a leader election) for up to ACK_PATIENCE. Failing instead would have the
    input redelivered and the attempt made again: for delivery, a second copy of mail the MX
    already accepted. Every publish carries a message id, so a repeat stores nothing twice.

    `stop`: the caller's stop. With it, outcomes JetStream has no room for (`store_full`) are
    asked again until it is set, not for ACK_PATIENCE only: a full store lasts until room is
    made, and the job redelivered meanwhile would find no record of its attempt and send again,
    once per redelivery. The input stays in progress meanwhile (`bus.consume`).

    `retry_stored`, `notice_stored`: these outcomes are those of the recipients left of a partly
    settled attempt (`services.delivery.redelivery`), whose retry or bounce notice an earlier
    settling stored. Unless these outcomes replace that retry (new deferrals), it goes on with
    the job's body reference, and its final outcome releases the body; released here, the
    retry would find it gone. This settling's notice is the stored one's duplicate: it takes
    no body reference of its own, which nothing would release.

    Every attempt must decide the same (retry or expiry, and the retry time): an attempt whose
    publish timed out may still have been stored, and a second attempt that decided otherwise
    would give the job two fates. So the clock is read once and each attempt replays the same
    jitter: a private generator from one seed, which leaves a caller's shared `rng` alone."""
    decided_at = time.time() if now is None else now
    # The module's generator when no `rng` is given: a fresh Random() reads os.urandom.
    seed = rng.random() if rng else random.random()

    async def attempt() -> Event | None:
        return await _settle_once(
            bus,
            bodies,
            retry,
            env,
            outcomes,
            mx_host=mx_host,
            source_ip=source_ip,
            now=decided_at,
            seed=seed,
            facts=facts,
            retry_stored=retry_stored,
            notice_stored=notice_stored,
        )

    deferred = await _patiently_while_full(attempt, f"outcomes of {env.key}", stop)
    if deferred is not None:
        await _report_deferred(bus, deferred, env)


async def _patiently_while_full(
    attempt: Callable[[], Awaitable[Event | None]], what: str, stop: asyncio.Event | None
) -> Event | None:
    """`patiently`, round after round while JetStream has no room, until `stop` is set."""
    while True:
        try:
            return await patiently(attempt, what)
        except BrokerUnavailable as exc:
            if not exc.store_full or stop is None or stop.is_set():
                raise
            log.error("%s: JetStream storage is full; kept and asked again: %s", what, exc)


async def _report_deferred(bus: Bus, event: Event, env: Envelope) -> None:
    """The `deferred` event's span event goes into the attempt's span here, once however many
    times `_settle_once` ran. Its publish only reports a stored retry, so it does not hold the
    ack; it is counted there, unless JetStream already held it (a redelivered attempt)."""
    annotate_event(event)
    key = env.key
    msg_id = f"dfr-{key}-{env.attempt_count + 1}"
    await report_later(bus, event, msg_id=msg_id, what=f"deferred event of {key}")


async def _settle_once(
    bus: Bus,
    bodies: BodyStore,
    retry: RetryConfig,
    env: Envelope,
    outcomes: Sequence[Outcome],
    *,
    mx_host: str,
    source_ip: str,
    now: float,
    seed: float,
    facts: Mapping[str, object] | None,
    retry_stored: bool = False,
    notice_stored: bool = False,
) -> Event | None:
    """Publish every consequence of one attempt but the `deferred` event, which it returns (None
    when nothing was retried) for `settle` to report. `facts` (mx_address, tls_version,
    tls_cipher, duration_ms) describe the SMTP attempt and go into its delivered/deferred events."""
    extra = dict(facts or {})
    delivered = [o for o in outcomes if isinstance(o, Delivered)]
    deferred = [o for o in outcomes if isinstance(o, Deferred)]
    bounced = [o for o in outcomes if isinstance(o, Bounced)]
    key = env.key
    round_no = env.attempt_count + 1
    deferred_event: Event | None = None
    asked = set(dsn_recipients(env, [o.recipient for o in delivered], action="relayed"))
    relayed = tuple(o for o in delivered if o.recipient in asked)
    notice_holder = ""

    if deferred:
        reply = deferred[0].reply
        attempted = env.with_attempt(Attempt(now, reply, mx_host, source_ip))
        at = next_attempt_at(env.received_at, attempted.attempt_count, now, retry, random.Random(seed))
        if at is None:
            bounced += [
                Bounced(o.recipient, expiry_reply(o.reply), o.mx_host, expired=True) for o in deferred
            ]
            deferred = []
        else:
            again = replace(attempted, recipients=tuple(o.recipient for o in deferred))
            # The job keeps its body for the retry; a DSN of this attempt holds it as well,
            # before the retry is stored, so that the retry cannot end first and release it.
            if bounced or relayed:
                notice_holder = await _own_body_reference(bodies, env, f"{key}#bn{round_no}")
            if wants_delay_warning(env, retry, now):
                again = replace(again, meta={**again.meta, DELAY_WARNED: "1"})
                warning = BounceNotice(
                    envelope=attempted,
                    failures=tuple(Bounced(o.recipient, o.reply, o.mx_host) for o in deferred),
                    releases_body=False,
                    delay_warning=True,
                    holds_body=await _own_body_reference(bodies, env, f"{key}#dw"),
                )
                await bus.publish(
                    bounce_subject(),
                    warning.to_msgpack(),
                    msg_id=f"dw-{key}",
                    headers={"traceparent": env.trace_context} if env.trace_context else None,
                    attributes={"relais.message_id": env.id},
                )
            headers = {"traceparent": env.trace_context} if env.trace_context else {}
            if not bounced and not delivered:
                # The retry is the attempt's whole outcome. Once it fires its schedule leaves the
                # subject, and only this id tells a job redelivered after that (its worker died
                # before the ack) that the attempt was settled (`redelivery.stored_outcome`).
                # None otherwise: settling a partly settled attempt again replaces its retry,
                # which a stored id would drop as a duplicate.
                headers[Header.MSG_ID] = retry_msg_id(key, round_no)
            await publish_at(
                bus,
                schedule_subject=route_retry_subject(key, round_no),
                target_subject=route_subject(),
                payload=again.to_msgpack(),
                at=at,
                headers=headers,
                attributes={"relais.message_id": env.id, "relais.attempt": round_no},
            )
            deferred_event = event_for(
                "deferred",
                attempted,
                again.recipients,
                reply,
                mx_host=mx_host,
                source_ip=source_ip,
                detail={"retry_at": f"{at:.0f}"},
                **extra,
            )

    # The job's body reference goes last: with its retry, else after the `delivered` event below,
    # else with the notice once its DSN is built. A notice released it before that event was
    # stored: a worker dying in between left the job, come back, without the body to send its
    # delivered recipients again, and them without an outcome.
    earlier = retry_stored or notice_stored
    notice_releases = bool(bounced) and not deferred and not delivered and not earlier
    if (bounced or relayed) and delivered and not deferred and not earlier:
        notice_holder = await _own_body_reference(bodies, env, f"{key}#bn{round_no}")

    if bounced or relayed:
        # One notice per attempt, failures and successes together: one holder of the body, so
        # the DSN of neither can find it released by the other.
        notice = BounceNotice(
            envelope=env.with_attempt(Attempt(now, (bounced or relayed)[0].reply, mx_host, source_ip)),
            failures=tuple(bounced),
            releases_body=notice_releases,
            relayed=relayed,
            holds_body=notice_holder,
        )
        await bus.publish(
            bounce_subject(),
            notice.to_msgpack(),
            msg_id=f"bn-{key}-{round_no}",
            headers={"traceparent": env.trace_context} if env.trace_context else None,
            attributes={"relais.message_id": env.id},
        )

    if delivered:
        # Numbered like the deferred and bounced events of the same attempt: the first try is 1.
        await publish_event(
            bus,
            event_for(
                "delivered",
                env.with_attempt(Attempt(now, delivered[0].reply, mx_host, source_ip)),
                [o.recipient for o in delivered],
                delivered[0].reply,
                mx_host=mx_host,
                source_ip=source_ip,
                **extra,
            ),
            msg_id=f"dlv-{key}-{round_no}",
        )

    if not deferred and not retry_stored and not notice_releases:
        await bodies.release(env.body, key)
    return deferred_event


async def _own_body_reference(bodies: BodyStore, env: Envelope, holder: str) -> str:
    """A reference of a notice's own on the job's stored body ("" for an inline body)."""
    if env.body.is_inline:
        return ""
    await bodies.add_holder(env.body, holder, beside=env.key)
    return holder
