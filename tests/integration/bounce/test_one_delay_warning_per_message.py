"""A message still undelivered after `retry.delay_warning_after` gets ONE delayed DSN, as the
setting says and Postfix does, however many domain jobs it was split into.

Each domain job sends its own delay warning when its first deferral past that age comes, and
jobs retried on their own jittered schedules reach it minutes apart: the warnings then fell
into separate DSN windows (or, with `dsn_window = 0`, went one by one), and the sender of a
message to three slow domains was warned three times.

The bounce service runs against a real nats-server; its DSNs stay in the route stream (no
router runs here), where they are counted."""

from __future__ import annotations

import email
from dataclasses import replace

import pytest
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from services.bounce.dsn import SUBJECT_DELAYED, SUBJECT_FAILED
from services.bounce.hold import DELAYED, FAILED, FlushRequest, Windows, windows_key
from services.bounce.service import BounceService
from services.core.bus import Bus
from services.core.config import BounceConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.envelope import Attempt, BounceNotice, Envelope
from services.core.outcome import Bounced, Reply
from services.core.topology import BOUNCE_HOLD_BUCKET, SUBMIT_STREAM, bounce_flush_subject, bounce_subject
from tests.support.relais import an_envelope

SLOW = Reply(451, "4.2.0", "Try again later", "RCPT")
GONE = Reply(550, "5.1.1", "No such user", "RCPT")
ORIGINAL = b"From: news@acme.test\r\nTo: ann@alpha.test, bob@beta.test\r\nSubject: Hello\r\n\r\nHi.\r\n"


def job(message: Envelope, index: int, recipient: str, rounds: int) -> Envelope:
    """One domain job of the message after `rounds` deferred attempts."""
    domain = recipient.partition("@")[2]
    return replace(
        message,
        job_id=f"{message.id}-{index}",
        recipients=(recipient,),
        domain=domain,
        attempts=tuple(Attempt(message.received_at + n, SLOW, f"mx.{domain}") for n in range(rounds)),
    )


def warning(env: Envelope) -> BounceNotice:
    """What `settle` sends for a job's first deferral past delay_warning_after."""
    failures = tuple(Bounced(rcpt, SLOW, f"mx.{env.domain}") for rcpt in env.recipients)
    return BounceNotice(envelope=env, failures=failures, releases_body=False, delay_warning=True)


def msg(subject: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers={})  # type: ignore[arg-type]


async def open_window(bus: Bus, message_id: str, kind: str) -> str:
    kv = await bus.js.key_value(BOUNCE_HOLD_BUCKET)
    windows = Windows.from_json((await kv.get(windows_key(message_id))).value or b"")
    wid = windows.open_of(kind)
    assert wid is not None
    return wid


async def report(service: BounceService, bus: Bus, notice: BounceNotice, window: float) -> None:
    """Hand the notice to the bounce consumer and, with a window, fire its window's end."""
    await service.handle(msg(bounce_subject(), notice.to_msgpack()))
    if window:
        kind = DELAYED if notice.delay_warning else FAILED
        wid = await open_window(bus, notice.envelope.id, kind)
        await service.flush(msg(bounce_flush_subject(), FlushRequest(notice.envelope.id, wid).to_json()))


async def dsns_for(bus: Bus, message_id: str) -> list[email.message.Message]:
    info = await bus.js.stream_info(SUBMIT_STREAM)
    found: list[email.message.Message] = []
    if not info.state.messages:
        return found  # an empty stream's first sequence is 0, which no get may ask for
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            stored = await bus.js.get_msg(SUBMIT_STREAM, seq)
        except NotFoundError:
            continue
        env = Envelope.from_msgpack(stored.data or b"")
        if env.kind == "dsn" and env.meta.get("dsn_for") == message_id:
            assert env.body.inline is not None
            found.append(email.message_from_bytes(env.body.inline))
    return found


@pytest.mark.parametrize("window", [60.0, 0.0])
async def test_a_message_split_into_domain_jobs_gets_one_delay_warning(
    topology_bus: Bus, nats_server: EmbeddedNats, window: float
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url), bounce=BounceConfig(dsn_window=window))
    service = BounceService(config, topology_bus)
    message = an_envelope("ann@alpha.test", "bob@beta.test", body=ORIGINAL)
    alpha, beta = job(message, 0, "ann@alpha.test", 8), job(message, 1, "bob@beta.test", 9)

    await report(service, topology_bus, warning(alpha), window)
    (first,) = await dsns_for(topology_bus, message.id)
    assert first["Subject"] == SUBJECT_DELAYED

    # The other job reaches the warning age on its own schedule, after the first warning went.
    await report(service, topology_bus, warning(beta), window)
    assert [d["Subject"] for d in await dsns_for(topology_bus, message.id)] == [SUBJECT_DELAYED]

    # Failures are not limited: bob's final failure still gets its DSN.
    last = Attempt(message.received_at + 99, GONE, "mx.beta.test")
    failure = Bounced("bob@beta.test", GONE, "mx.beta.test")
    await report(
        service,
        topology_bus,
        BounceNotice(replace(beta, attempts=(*beta.attempts, last)), (failure,)),
        window,
    )
    subjects = [d["Subject"] for d in await dsns_for(topology_bus, message.id)]
    assert subjects == [SUBJECT_DELAYED, SUBJECT_FAILED]
