"""A delay warning that the bounce service comes to only after its message's final outcome is
not sent: a sender must never hear "still trying" after "failed", or after delivery.

`settle` publishes the warning with the retry it announces. When the bounce service has a
backlog (here: it is not running yet), that retry runs, and the message is delivered or bounced,
before the warning is read. It used to go out anyway, as late as the backlog, beside (or after)
the failure's own DSN.

Real nats-server, router, delivery and bounce service; the sender's MX is a real SMTP sink, and
each scenario ends with a DSN that must arrive (the failure, or the success the sender asked
for), after which every consumer is drained and nothing else may have come."""

from __future__ import annotations

import asyncio
import email
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from services.bounce import service as service_module
from services.bounce.dsn import SUBJECT_DELAYED, SUBJECT_DELIVERED, SUBJECT_FAILED
from services.bounce.hold import DELAYED, FlushRequest
from services.bounce.service import BounceService
from services.core.bus import Bus
from services.core.config import BounceConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.envelope import Attempt, BodyRef, Envelope, new_message_id
from services.core.schedule import publish_at
from services.core.topology import (
    BOUNCE_STREAM,
    ROUTE_STREAM,
    bounce_flush_subject,
    route_retry_subject,
    route_subject,
)
from tests.integration.bounce.conftest import publish_submission, wait_settled
from tests.integration.bounce.test_one_delay_warning_per_message import (
    ORIGINAL,
    SLOW,
    dsns_for,
    msg,
    open_window,
    report,
    warning,
)
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, RelaisStack, an_envelope, message, wait_for_events
from tests.support.smtp_sink import SMTPSink

REJECT = "550 5.1.1 No such user here"
RCPT = "ann@alpha.test"
# Retries a second apart; the warning goes with the first deferral half a second after arrival.
RETRY = {"base_delay": 1.0, "max_delay": 1.0, "jitter": 0.0, "max_age": 3600.0, "delay_warning_after": 0.5}
NOT_BOUNCE = ("ingress", "router", "delivery")


async def submit(nats_url: str, notify: str | None = None) -> str:
    """A message to RCPT as the ingress queues it (NOTIFY as given at RCPT TO)."""
    data = message()
    env = Envelope(
        id=new_message_id(),
        sender=f"news@{SENDER_DOMAIN}",
        recipients=(RCPT,),
        account=ACCOUNT,
        sender_domain=SENDER_DOMAIN,
        body=BodyRef(size=len(data), inline=data),
        dsn_notify={RCPT: notify} if notify else {},
    )
    await publish_submission(nats_url, env)
    return env.id


async def notices_waiting(nats_url: str, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Until the bounce stream holds `count` notices that no bounce service has read."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while (await js.stream_info(BOUNCE_STREAM)).state.messages < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} notices in {BOUNCE_STREAM}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def subjects(sink: SMTPSink) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in sink.messages]


async def test_a_warning_read_after_the_message_failed_is_not_sent(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], sender_mx: SMTPSink
) -> None:
    stack: RelaisStack = await make_stack(services=NOT_BOUNCE, retry=RETRY)
    alpha = make_sink("127.0.0.2")
    alpha.tempfail_data = 1000
    await submit(stack.config.nats.url)
    await notices_waiting(stack.config.nats.url, 1)  # the warning, with its retry scheduled

    alpha.tempfail_data, alpha.rcpt_default = 0, REJECT  # the next retry fails for good
    await notices_waiting(stack.config.nats.url, 2)
    await make_stack(services=("bounce",), retry=RETRY)  # the bounce service's backlog

    await sender_mx.async_wait_for(1)
    await wait_settled(stack.config.nats.url)
    assert subjects(sender_mx) == [SUBJECT_FAILED], "no 'still trying' beside 'failed'"


async def test_a_warning_read_after_the_message_was_delivered_is_not_sent(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], sender_mx: SMTPSink
) -> None:
    stack: RelaisStack = await make_stack(services=NOT_BOUNCE, retry=RETRY)
    alpha = make_sink("127.0.0.2")
    alpha.tempfail_data = 1000
    # NOTIFY=SUCCESS as well: the success DSN is what the sender must get, and only it.
    await submit(stack.config.nats.url, notify="SUCCESS,DELAY")
    await notices_waiting(stack.config.nats.url, 1)

    alpha.tempfail_data = 0  # the next retry is delivered
    await notices_waiting(stack.config.nats.url, 2)
    assert len(alpha.messages) == 1
    await make_stack(services=("bounce",), retry=RETRY)

    await sender_mx.async_wait_for(1)
    await wait_settled(stack.config.nats.url)
    assert subjects(sender_mx) == [SUBJECT_DELIVERED], "no 'still trying' after delivery"


async def test_a_late_warning_whose_message_is_still_retried_is_sent(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], sender_mx: SMTPSink
) -> None:
    # Back-off 1, 2, 4, 8 s: the bounce service comes once the announced retry has run, while
    # the next one waits four seconds in its schedule.
    retry = {**RETRY, "max_delay": 30.0}
    stack: RelaisStack = await make_stack(services=NOT_BOUNCE, retry=retry)
    make_sink("127.0.0.2").tempfail_data = 1000
    await submit(stack.config.nats.url)
    await wait_for_events(stack.config.nats.url, "deferred", 3)
    await make_stack(services=("bounce",), retry=retry)

    (delayed,) = await sender_mx.async_wait_for(1)
    assert email.message_from_bytes(delayed.data)["Subject"] == SUBJECT_DELAYED


@pytest.mark.parametrize("retried", [False, True])
async def test_a_flush_come_late_sends_a_warning_only_while_its_job_is_retried(
    topology_bus: Bus, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, retried: bool
) -> None:
    """The warning was read in time and joined its window; the window's flush comes an hour
    late (the service was stopped), after the job's retry ran, unless it is still scheduled."""
    config = Config(nats=NatsConfig(url=nats_server.url), bounce=BounceConfig(dsn_window=60.0))
    service = BounceService(config, topology_bus)
    message = an_envelope(RCPT, body=ORIGINAL)
    first = time.time() - config.retry.max_delay
    job = replace(
        message,
        job_id=f"{message.id}-0",
        domain="alpha.test",
        received_at=first,
        attempts=tuple(Attempt(first + n, SLOW, "mx.alpha.test") for n in range(8)),
    )
    # The retry the warning announced, in its schedule: the job is still being retried.
    retry_subject = route_retry_subject(job.key, job.attempt_count)
    await publish_at(
        topology_bus,
        schedule_subject=retry_subject,
        target_subject=route_subject(),
        payload=job.to_msgpack(),
        at=time.time() + 3600,
    )
    await report(service, topology_bus, warning(job), window=0)  # held, not flushed yet
    wid = await open_window(topology_bus, message.id, DELAYED)

    if not retried:  # it fired meanwhile, and the job ended
        await topology_bus.js.purge_stream(ROUTE_STREAM, subject=retry_subject)
    clock = time.time
    monkeypatch.setattr(service_module, "time", SimpleNamespace(time=lambda: clock() + 3600))
    await service.flush(msg(bounce_flush_subject(), FlushRequest(message.id, wid).to_json()))

    sent = [d["Subject"] for d in await dsns_for(topology_bus, message.id)]
    assert sent == ([SUBJECT_DELAYED] if retried else [])
