"""Message schedules (ADR-51) under the service users of deploy/k8s/base/nats.conf.

When a schedule fires, the server itself publishes its payload to its `Nats-Schedule-Target`:
the publisher's permissions are checked for the schedule's own subject only. What nats-server
2.15 checks instead, and these tests pin:

- the target must be a subject of the schedule's own stream (JSMessageSchedulesTargetInvalid,
  10190): no schedule fires into another stream, an account record (`$KV.relais-accounts.*`, a
  login) or a subject that no stream holds, whoever may publish there;
- only a stream with `allow_msg_schedules` takes one (JSMessageSchedulesDisabled, 10188): the
  buckets, the counters and the events take none;
- what a schedule fires is inert: the server strips the schedule's headers (and its msg id)
  and sets `Nats-Scheduler`, the schedule's subject, which it refuses from a client (10212).

Within its stream, though, a schedule fires into a subject its publisher may not publish:
delivery, which postpones jobs on the delivery stream, into `relais.verdict`; the router, which
publishes delivery jobs, into a delivery retry subject, and the jobs it routes again
(`relais.route`) into a job's route retry subject. Those who read these subjects tell a fired
message from their own (`services.core.schedule.fired_by`, `is_schedule`).

nats-server gives a stream that takes schedules roll-ups too, whatever its configuration says,
and stores a schedule as a roll-up of its own subject: a user that may publish one subject of
such a stream can empty it. The ingress and bounce publish new mail to `relais.submit`, whose
stream takes neither schedules nor roll-ups, and may not publish `relais.route`: neither can
empty a mail queue. Not closed (the last test, expected to fail): the router and delivery,
which both publish to the route and delivery streams, can still empty those.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import nats
import pytest
from nats.js.api import Header, RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from services.bounce.retrying import pending_recipients
from services.core import topology
from services.core.bus import Bus
from services.core.envelope import Attempt, Reply, Verdict
from services.core.schedule import publish_at, rfc3339
from services.delivery.redelivery import NOTHING, stored_outcome
from tests.integration.test_k8s_nats_permissions import (  # noqa: F401 - fixtures
    Probe,
    ShippedNats,
    _as_user,
    _refused_request,
    probe,
    shipped_nats,
)
from tests.support.relais import ACCOUNT, RelaisStack, an_envelope, make_config, read_events

# JSMessageSchedulesTargetInvalid, JSMessageSchedulesDisabled.
TARGET_INVALID = 10190
SCHEDULES_DISABLED = 10188
# Every stream a probe's publish could have reached.
STREAMS = (
    topology.SUBMIT_STREAM,
    topology.ROUTE_STREAM,
    topology.DELIVER_STREAM,
    topology.BOUNCE_STREAM,
    topology.BOUNCE_FLUSH_STREAM,
    topology.INBOUND_STREAM,
    topology.EVENTS_STREAM,
    topology.LIMITS_STREAM,
    topology.kv_stream(topology.ACCOUNTS_BUCKET),
    topology.kv_stream(topology.SUPPRESSION_BUCKET),
)
_INTRUDER = topology.kv_subject(topology.ACCOUNTS_BUCKET, "intruder")


def _schedule(target: str, delay: float = 1.0) -> dict[str, str]:
    return {Header.SCHEDULE: f"@at {rfc3339(time.time() + delay)}", Header.SCHEDULE_TARGET: target}


async def _stored(admin: nats.NATS) -> dict[str, int]:
    js = admin.jetstream()
    return {stream: (await js.stream_info(stream)).state.messages for stream in STREAMS}


async def _last(admin: nats.NATS, stream: str, subject: str) -> RawStreamMsg | None:
    try:
        return await admin.jetstream().get_msg(stream, subject=subject, direct=False)
    except NotFoundError:
        return None


async def _fired(admin: nats.NATS, stream: str, subject: str, timeout: float = 5.0) -> RawStreamMsg:  # noqa: ASYNC109 - a polling deadline
    """The message a schedule fired into `subject`, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await _last(admin, stream, subject)
        if msg is not None and msg.headers and Header.SCHEDULER.value in msg.headers:
            return msg
        await asyncio.sleep(0.1)
    raise AssertionError(f"no schedule fired into {subject} within {timeout}s")


# (user, a subject of a schedule stream it publishes, a target outside that stream). The
# account records above all: a record is a login that may relay.
OUTSIDE_ITS_STREAM = [
    ("router", topology.route_retry_subject("job", 1), _INTRUDER),
    ("delivery", topology.deliver_retry_subject("job", 1), _INTRUDER),
    ("bounce", topology.bounce_window_subject("msg", "win"), _INTRUDER),
    ("router", topology.route_subject(), _INTRUDER),
    # Another stream's subject the user may not publish.
    ("delivery", topology.deliver_retry_subject("job", 1), topology.bounce_flush_subject()),
    ("router", topology.route_subject(), topology.inbound_subject()),
    # ... or may publish: the rule is the stream, not the permissions.
    ("router", topology.verdict_subject(), topology.route_subject()),
    # A subject no stream holds: a core NATS message nobody would have checked.
    ("delivery", topology.route_subject(), "relais.nowhere"),
]


@pytest.mark.parametrize(
    ("user", "subject", "target"), OUTSIDE_ITS_STREAM, ids=[f"{u}:{s}->{t}" for u, s, t in OUTSIDE_ITS_STREAM]
)
async def test_a_schedule_cannot_fire_outside_its_own_stream(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    subject: str,
    target: str,
) -> None:
    connection = await probe(user)
    with pytest.raises(APIError) as refused:
        await connection.nc.jetstream(timeout=5).publish(subject, b"forged", headers=_schedule(target))
    assert refused.value.err_code == TARGET_INVALID
    await asyncio.sleep(2)  # past the time it would have fired
    async with shipped_nats.admin() as admin:
        assert await _stored(admin) == dict.fromkeys(STREAMS, 0)
    assert connection.refusals == []


# Streams without schedules: a schedule there would fire into the rest of the bucket or stream.
# The events above all: the router publishes `suppressed` events, but not `delivered` ones.
# (user, a subject it publishes, the target, what else its publishes there carry)
WITHOUT_SCHEDULES = [
    # New mail: the only mail stream the ingress and bounce publish to.
    ("ingress", topology.submit_subject(), _INTRUDER, {}),
    ("ingress", topology.submit_subject(), "relais.nowhere", {}),
    ("bounce", topology.submit_subject(), topology.bounce_subject(), {}),
    (
        "router",
        topology.event_subject(ACCOUNT, "suppressed"),
        topology.event_subject(ACCOUNT, "delivered"),
        {},
    ),
    ("ingress", topology.kv_subject(topology.ACCOUNTS_BUCKET, "newsletter"), _INTRUDER, {}),
    # The counters' stream takes increments only.
    (
        "ingress",
        topology.limit_subject("msg-hour", ACCOUNT, 1),
        topology.limit_subject("msg-day", ACCOUNT, 1),
        {Header.INCR.value: "1"},
    ),
    ("bounce", topology.kv_subject(topology.SUPPRESSION_BUCKET, "acme.x"), _INTRUDER, {}),
]


@pytest.mark.parametrize(
    ("user", "subject", "target", "extra"),
    WITHOUT_SCHEDULES,
    ids=[f"{u}:{s}->{t}" for u, s, t, _ in WITHOUT_SCHEDULES],
)
async def test_a_stream_without_schedules_refuses_one(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    subject: str,
    target: str,
    extra: dict[str, str],
) -> None:
    connection = await probe(user)
    with pytest.raises(APIError) as refused:
        await connection.nc.jetstream(timeout=5).publish(subject, b"", headers=_schedule(target) | extra)
    assert refused.value.err_code == SCHEDULES_DISABLED
    await asyncio.sleep(2)
    async with shipped_nats.admin() as admin:
        assert await _stored(admin) == dict.fromkeys(STREAMS, 0)


# The control: each service's own schedule fires into its own stream.
OWN_SCHEDULES = [
    ("router", topology.ROUTE_STREAM, topology.route_retry_subject("job", 1), topology.route_subject()),
    ("delivery", topology.ROUTE_STREAM, topology.route_retry_subject("job", 1), topology.route_subject()),
    (
        "delivery",
        topology.DELIVER_STREAM,
        topology.deliver_retry_subject("job", 1),
        topology.deliver_subject("default"),
    ),
    (
        "bounce",
        topology.BOUNCE_FLUSH_STREAM,
        topology.bounce_window_subject("msg", "win"),
        topology.bounce_flush_subject(),
    ),
]


@pytest.mark.parametrize(
    ("user", "stream", "subject", "target"),
    OWN_SCHEDULES,
    ids=[f"{u}:{s}->{t}" for u, _, s, t in OWN_SCHEDULES],
)
async def test_a_services_own_schedule_fires_inert_into_its_stream(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    stream: str,
    subject: str,
    target: str,
) -> None:
    """What a schedule fires carries no schedule (it cannot fire again, nor pass for a
    retry still to come) and names the schedule it came from, which a client cannot forge."""
    connection = await probe(user)
    headers = _schedule(target) | {Header.MSG_ID: "own-schedule", "traceparent": "kept"}
    await connection.nc.jetstream(timeout=5).publish(subject, b"payload", headers=headers)
    async with shipped_nats.admin() as admin:
        fired = await _fired(admin, stream, target)
        assert fired.data == b"payload"
        assert fired.headers == {
            Header.SCHEDULER.value: subject,
            Header.SCHEDULE_NEXT.value: "purge",
            "traceparent": "kept",
        }
        assert await _last(admin, stream, subject) is None  # the schedule is gone
    with pytest.raises(APIError) as refused:
        await connection.nc.jetstream(timeout=5).publish(
            subject, b"forged", headers={Header.SCHEDULER.value: subject}
        )
    assert refused.value.err_code == 10212  # JSMessageSchedulesSchedulerInvalid
    assert connection.refusals == []


# -- within its stream: delivery's postponements fire into the router's verdicts ----------------


@pytest.fixture
async def router(
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
) -> AsyncIterator[RelaisStack]:
    """The router, as its own user, on the topology applied as `admin`."""
    config = make_config(nats_url=shipped_nats.url())
    async with shipped_nats.admin() as admin:
        await topology.ensure_topology(admin.jetstream(), config)
    stack = RelaisStack(_as_user(config, shipped_nats, "router"))
    await stack.start(["router"])
    try:
        yield stack
    finally:
        await stack.stop()


def _verdict() -> Verdict:
    """A routing pass's verdict: one recipient dropped for the suppression list (a `suppressed`
    event, which only the router writes), the other one's delivery job."""
    env = an_envelope("a@alpha.test", pool="default")
    env = replace(env, job_id=f"{env.id}-1")
    return Verdict(
        env, None, False, time.time(), 0.5, suppressed=("gone@alpha.test",), suppressed_for="bounce"
    )


async def _verdicts_handled(admin: nats.NATS, count: int) -> None:
    js = admin.jetstream()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        info = await js.consumer_info(topology.DELIVER_STREAM, topology.VERDICT_CONSUMER)
        if info.delivered.consumer_seq >= count and info.num_ack_pending == 0 and info.num_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the router did not handle {count} verdict(s)")


async def test_a_verdict_fired_by_a_schedule_is_not_carried_out(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    router: RelaisStack,
) -> None:
    """Delivery may not publish `relais.verdict`; a schedule on its postponement subject may
    fire there (same stream). The router stores its verdicts itself, never through a schedule,
    and drops one that a schedule fired."""
    delivery = await probe("delivery")
    verdict = _verdict()
    subject = topology.deliver_retry_subject(verdict.envelope.key, 0)
    await delivery.nc.jetstream(timeout=5).publish(
        subject, verdict.to_msgpack(), headers=_schedule(topology.verdict_subject())
    )
    async with shipped_nats.admin() as admin:
        await _verdicts_handled(admin, 1)  # fired, and the router had it
        assert [e for e in await read_events(shipped_nats.url()) if e.kind == "suppressed"] == []
        deliver = topology.deliver_subject("default")
        assert await _last(admin, topology.DELIVER_STREAM, deliver) is None
    assert delivery.refusals == []


async def test_a_verdict_the_router_stored_is_carried_out(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    router: RelaisStack,
) -> None:
    connection = await probe("router")
    verdict = _verdict()
    await connection.nc.jetstream(timeout=5).publish(topology.verdict_subject(), verdict.to_msgpack())
    async with shipped_nats.admin() as admin:
        await _verdicts_handled(admin, 1)
        (suppressed,) = [e for e in await read_events(shipped_nats.url()) if e.kind == "suppressed"]
        assert suppressed.recipients == ["gone@alpha.test"]
        assert await _last(admin, topology.DELIVER_STREAM, topology.deliver_subject("default")) is not None


# -- within its stream: the router and delivery fire into jobs' retry subjects ---------------------

# (user, its subject in the retry's stream, the stream, the retry subject of a job's next round)
INTO_RETRY_SUBJECTS = [
    ("router", topology.route_subject(), topology.ROUTE_STREAM, topology.route_retry_subject),
    ("delivery", topology.route_subject(), topology.ROUTE_STREAM, topology.route_retry_subject),
    ("router", topology.verdict_subject(), topology.DELIVER_STREAM, topology.deliver_retry_subject),
]


@pytest.mark.parametrize(
    ("user", "subject", "stream", "retry_subject"),
    INTO_RETRY_SUBJECTS,
    ids=[f"{u}->{s}" for u, _, s, _ in INTO_RETRY_SUBJECTS],
)
async def test_a_message_fired_into_a_jobs_retry_subject_is_no_retry(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    subject: str,
    stream: str,
    retry_subject: Callable[[str, int], str],
) -> None:
    """Whoever reads a job's retry subjects takes only a schedule for its retry: delivery,
    settling a job redelivered after a lost ack (every recipient deferred with a stored retry:
    settled, so nothing is sent now), and bounce, before a late delay warning."""
    job = replace(an_envelope("a@alpha.test", "b@alpha.test"), job_id="msg-1", pool="default")
    attempt = job.with_attempt(Attempt(time.time(), Reply(451, "4.7.1", "later")))
    forger = await probe(user)
    target = retry_subject(job.key, attempt.attempt_count)
    await forger.nc.jetstream(timeout=5).publish(subject, attempt.to_msgpack(), headers=_schedule(target))
    async with shipped_nats.admin() as admin:
        await _fired(admin, stream, target)
    delivery, bounce = await probe("delivery"), await probe("bounce")
    if stream == topology.ROUTE_STREAM:
        bus = Bus(nc=delivery.nc, js=delivery.nc.jetstream(timeout=5), publish_timeout=5.0)
        assert await stored_outcome(bus, job) == NOTHING
    assert await pending_recipients(bounce.nc.jetstream(timeout=5), job.key) == set()
    assert delivery.refusals == bounce.refusals == []


@pytest.mark.parametrize(
    ("stream", "retry_subject", "target"),
    [
        (topology.ROUTE_STREAM, topology.route_retry_subject, topology.route_subject()),
        (topology.DELIVER_STREAM, topology.deliver_retry_subject, topology.deliver_subject("default")),
    ],
    ids=["route", "deliver"],
)
async def test_a_jobs_retry_schedule_is_its_retry(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    stream: str,
    retry_subject: Callable[[str, int], str],
    target: str,
) -> None:
    job = replace(an_envelope("a@alpha.test", "b@alpha.test"), job_id="msg-1", pool="default")
    attempt = job.with_attempt(Attempt(time.time(), Reply(451, "4.7.1", "later")))
    delivery, bounce = await probe("delivery"), await probe("bounce")
    bus = Bus(nc=delivery.nc, js=delivery.nc.jetstream(timeout=5), publish_timeout=5.0)
    await publish_at(
        bus,
        schedule_subject=retry_subject(job.key, attempt.attempt_count),
        target_subject=target,
        payload=attempt.to_msgpack(),
        at=time.time() + 600,
    )
    if stream == topology.ROUTE_STREAM:
        assert (await stored_outcome(bus, job)).complete
    assert await pending_recipients(bounce.nc.jetstream(timeout=5), job.key) == {
        "a@alpha.test",
        "b@alpha.test",
    }


# -- closed: the ingress and bounce cannot empty a mail queue --------------------------------------

_ROLLUP = {Header.ROLLUP.value: "all"}
# JSStreamRollupFailedErrF: "rollup not permitted", the stream's answer.
ROLLUP_REFUSED = 10111
_RETRY = topology.route_retry_subject("job", 1)
# (user, subject, headers, what refuses them: the user's permissions (None), else the stream's
# error code). A schedule is stored as a roll-up of its own subject, so one on a subject of
# queued mail would remove that mail.
CANNOT_EMPTY = [
    (user, subject, headers, refusal)
    for user in ("ingress", "bounce")
    for subject, headers, refusal in (
        (topology.route_subject(), _ROLLUP, None),
        (topology.route_subject(), _schedule(topology.route_retry_subject("forged", 1), 600), None),
        (topology.submit_subject(), _ROLLUP, ROLLUP_REFUSED),
        (topology.submit_subject(), _schedule(topology.submit_subject(), 600), SCHEDULES_DISABLED),
    )
]


async def _queue_mail(admin: nats.NATS) -> None:
    """New mail waiting for the router, mail routed again, and a job's scheduled retry."""
    js = admin.jetstream()
    await js.publish(topology.submit_subject(), b"new mail")
    await js.publish(topology.route_subject(), b"routed again")
    await js.publish(_RETRY, b"scheduled retry", headers=_schedule(topology.route_subject(), delay=600))


async def _first(admin: nats.NATS, stream: str, subject: str) -> bytes | None:
    try:
        msg = await admin.jetstream().get_msg(stream, seq=1, subject=subject, next=True, direct=False)
    except NotFoundError:
        return None
    return msg.data


@pytest.mark.parametrize(
    ("user", "subject", "headers", "refusal"),
    CANNOT_EMPTY,
    ids=[f"{u}:{s}:{'rollup' if Header.ROLLUP.value in h else 'schedule'}" for u, s, h, _ in CANNOT_EMPTY],
)
async def test_the_ingress_and_bounce_cannot_empty_a_mail_queue(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    subject: str,
    headers: dict[str, str],
    refusal: int | None,
) -> None:
    """New mail, mail routed again and the retries scheduled beside it outlive anything the
    ingress (the internet-facing service) or bounce publish: they may not publish
    `relais.route` at all, and the submit stream, where they publish new mail, refuses
    roll-ups and schedules. Beside each refusal, the same user's new mail is taken."""
    connection = await probe(user)
    async with shipped_nats.admin() as admin:
        await _queue_mail(admin)
        forged = connection.nc.jetstream(timeout=5).publish(subject, b"", headers=headers)
        if refusal is None:
            assert await _refused_request(connection, forged, subject), f"{user} may publish {subject}"
        else:
            with pytest.raises(APIError) as refused:
                await forged
            assert refused.value.err_code == refusal
            assert connection.refusals == [], "the stream refused it, not the user's permissions"
        # The control: the same user's own output, without the header.
        ack = await connection.nc.jetstream(timeout=5).publish(topology.submit_subject(), b"more mail")
        assert ack.stream == topology.SUBMIT_STREAM
        assert await _first(admin, topology.SUBMIT_STREAM, topology.submit_subject()) == b"new mail"
        assert await _first(admin, topology.ROUTE_STREAM, topology.route_subject()) == b"routed again"
        assert await _first(admin, topology.ROUTE_STREAM, _RETRY) == b"scheduled retry"
        counts = await _stored(admin)
        assert (counts[topology.SUBMIT_STREAM], counts[topology.ROUTE_STREAM]) == (2, 2)


# -- not closed: the router and delivery on the streams that take schedules ------------------------

# (user, a subject it publishes, that subject's stream, the headers). Both publish to the route
# stream (jobs routed again, retries) and to the delivery stream (jobs, postponements): new
# streams would not help, since whoever may write a queue can roll it up once it takes schedules.
ROLLUPS = [
    ("router", topology.deliver_subject("default"), topology.DELIVER_STREAM, _ROLLUP),
    ("router", topology.route_subject(), topology.ROUTE_STREAM, _ROLLUP),
]


@pytest.mark.xfail(
    strict=True,
    reason="nats-server sets allow_rollup_hdrs (and clears deny_purge) on a stream with "
    "allow_msg_schedules, and the router and delivery publish to the route and delivery streams",
)
@pytest.mark.parametrize(
    ("user", "subject", "stream", "headers"),
    ROLLUPS,
    ids=["router:rollup-deliver", "router:rollup-route"],
)
async def test_a_service_user_cannot_empty_a_mail_stream(
    probe: Callable[[str], Awaitable[Probe]],  # noqa: F811 - the imported fixture
    shipped_nats: ShippedNats,  # noqa: F811 - the imported fixture
    user: str,
    subject: str,
    stream: str,
    headers: dict[str, str],
) -> None:
    """Queued mail and the retries scheduled beside it outlive anything a service user publishes."""
    connection = await probe(user)
    async with shipped_nats.admin() as admin:
        js = admin.jetstream()
        await js.publish(subject, b"queued mail")
        retry = {
            topology.ROUTE_STREAM: (topology.route_retry_subject("job", 1), topology.route_subject()),
            topology.DELIVER_STREAM: (
                topology.deliver_retry_subject("job", 1),
                topology.deliver_subject("default"),
            ),
        }[stream]
        await js.publish(retry[0], b"scheduled retry", headers=_schedule(retry[1], delay=600))
        with contextlib.suppress(APIError):
            await connection.nc.jetstream(timeout=5).publish(subject, b"", headers=headers)
        await connection.nc.flush(timeout=5)
        assert (await _last(admin, stream, retry[0])) is not None, "the scheduled retry is gone"
        queued = await js.get_msg(stream, seq=1, subject=subject, next=True, direct=False)
        assert queued.data == b"queued mail", "the queued mail is gone"
