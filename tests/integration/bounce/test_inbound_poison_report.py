"""An inbound report whose reading fails every time is given up after `MAX_DELIVERIES`, and the
reports after it are read as usual. The consumer has no max_deliver (it must not drop a report
that a later try would read), so such a report came back for ever: nak'ed and redelivered when
the handler raised (MemoryError is raised on purpose), redelivered after ack_wait when the
replica holding it died. Meanwhile a report whose outcome NATS cannot take yet is not one: it
waits in place and keeps its deliveries.

The failures go in through the parse (`inbound.findings`, the seam the parse tests use too);
the nak backoff is cut to a fifth of a second so that endless redelivery shows in seconds."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import nats
import pytest

from services.bounce import inbound
from services.core import bus as transport
from services.core.envelope import new_message_id
from services.core.metrics import REGISTRY
from services.core.returnpath import verp_address
from services.core.topology import EVENTS_STREAM, INBOUND_CONSUMER, INBOUND_STREAM, stream_configs
from tests.integration.bounce.conftest import RETURN_DOMAIN, SECRET, VERP, publish_inbound
from tests.support.bounce_samples import postfix_dsn
from tests.support.relais import ACCOUNT, RelaisStack, wait_for_events

POISON = "poison@alpha.test"  # the recipient the poisoned report names


def report(recipient: str) -> tuple[bytes, str, str]:
    """A DSN about `recipient` to a valid return path: raw, its return path, the message id."""
    message_id = new_message_id()
    to = verp_address(
        prefix="b",
        domain=RETURN_DOMAIN,
        secret=SECRET,
        account=ACCOUNT,
        message_id=message_id,
        recipients=[recipient],
    )
    return postfix_dsn(to=to, recipient=recipient), to, message_id


def given_up(reason: str) -> float:
    return REGISTRY.get_sample_value("relais_inbound_given_up_total", {"reason": reason}) or 0.0


@pytest.fixture
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_error_delay", lambda msg: 0.2)


async def until_settled(url: str, deliveries: list[Any], timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Until the inbound consumer has nothing pending nor in hand, failing as soon as the
    poisoned report was delivered more than MAX_DELIVERIES times."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            assert len(deliveries) <= inbound.MAX_DELIVERIES, f"delivered {len(deliveries)} times"
            info = await js.consumer_info(INBOUND_STREAM, INBOUND_CONSUMER)
            if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0:
                return
            assert time.monotonic() < deadline, f"unsettled after {timeout}s, {len(deliveries)} deliveries"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_a_report_that_fails_every_time_is_given_up(
    make_stack, monkeypatch: pytest.MonkeyPatch, short_backoff: None
) -> None:
    deliveries: list[float] = []
    parse = inbound.findings

    def choking(raw: bytes, *args: Any) -> inbound.Verdict:
        if POISON.encode() in raw:
            deliveries.append(time.monotonic())
            raise MemoryError  # re-raised by the handler: another replica might manage it
        return parse(raw, *args)

    monkeypatch.setattr(inbound, "findings", choking)
    before = given_up("error")
    stack = await make_stack(services=("bounce",), bounce=VERP)
    url = stack.config.nats.url
    raw, to, _ = report(POISON)
    await publish_inbound(url, raw, [to])

    await until_settled(url, deliveries)
    assert len(deliveries) == inbound.MAX_DELIVERIES
    assert given_up("error") == before + 1

    raw, to, message_id = report("gone@alpha.test")
    await publish_inbound(url, raw, [to])
    (bounced,) = await wait_for_events(url, "bounced", 1)
    assert (bounced.message_id, bounced.recipients) == (message_id, ["gone@alpha.test"])
    await until_settled(url, deliveries)
    assert len(deliveries) == inbound.MAX_DELIVERIES


async def test_a_report_whose_reading_kills_the_replica_is_given_up(
    make_stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A report that has the pod killed for memory: no exception, no nak, no "in progress" any
    # more. Here a replica "dies" by losing its NATS connection in the middle of the parse,
    # which never returns; the next replica gets the report after ack_wait.
    loop = asyncio.get_running_loop()
    replicas: list[RelaisStack] = []
    deliveries: list[float] = []
    deaths: asyncio.Queue[None] = asyncio.Queue()
    the_end = threading.Event()
    parse = inbound.findings

    def fatal(raw: bytes, *args: Any) -> inbound.Verdict:
        if POISON.encode() not in raw:
            return parse(raw, *args)
        if len(deliveries) == inbound.MAX_DELIVERIES:
            deliveries.append(time.monotonic())
            raise RuntimeError("delivered once too often")  # fails the test without a hang
        dying = replicas[-1]  # the one alive: the next starts once this one is dead
        asyncio.run_coroutine_threadsafe(dying._buses[0].nc.close(), loop).result(10)
        deliveries.append(time.monotonic())
        loop.call_soon_threadsafe(deaths.put_nowait, None)
        the_end.wait(60)
        raise RuntimeError("never seen: the replica is gone")

    monkeypatch.setattr(inbound, "findings", fatal)
    before = given_up("lost")

    async def replica() -> None:
        replicas.append(await make_stack(services=("bounce",), bounce=VERP, nats={"ack_wait": 2.0}))

    try:
        await replica()
        url = replicas[0].config.nats.url
        raw, to, _ = report(POISON)
        await publish_inbound(url, raw, [to])
        for _ in range(inbound.MAX_DELIVERIES):
            await asyncio.wait_for(deaths.get(), 30)
            await replica()  # the next one, while the dead one's delivery waits out ack_wait

        await until_settled(url, deliveries)
        assert len(deliveries) == inbound.MAX_DELIVERIES
        assert given_up("lost") == before + 1

        raw, to, message_id = report("gone@alpha.test")
        await publish_inbound(url, raw, [to])
        (bounced,) = await wait_for_events(url, "bounced", 1)
        assert bounced.message_id == message_id
    finally:
        the_end.set()


async def test_a_report_nats_cannot_take_yet_waits_without_using_deliveries(
    make_stack, monkeypatch: pytest.MonkeyPatch, short_backoff: None
) -> None:
    # The events stream is away (a leader lost, an operator's mistake): the bounced event
    # cannot be published, JetStream answers "no responders" at once. Nak'ed, every try would
    # be a delivery, and an outage a few tries long would have the report given up.
    refused: list[float] = []
    publish = inbound.publish_event

    async def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return await publish(*args, **kwargs)
        except Exception:
            refused.append(time.monotonic())
            raise

    monkeypatch.setattr(inbound, "publish_event", counted)
    stack = await make_stack(services=("bounce",), bounce=VERP)
    url = stack.config.nats.url
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        (events,) = [s for s in stream_configs(stack.config) if s.name == EVENTS_STREAM]
        await js.delete_stream(EVENTS_STREAM)
        raw, to, message_id = report("gone@alpha.test")
        await publish_inbound(url, raw, [to])
        # Until the outcome was refused twice: nak'ed after the first, the report would be on
        # its second delivery by the second (the nak backoff is 0.2 s, the wait in place 1 s).
        deadline = time.monotonic() + 20
        while len(refused) < 2:
            assert time.monotonic() < deadline, f"the outcome was tried {len(refused)} times"
            await asyncio.sleep(0.05)
        info = await js.consumer_info(INBOUND_STREAM, INBOUND_CONSUMER)
        assert info.num_ack_pending == 1 and info.num_redelivered == 0
        await js.add_stream(events)

        (bounced,) = await wait_for_events(url, "bounced", 1)
        assert bounced.message_id == message_id
        await until_settled(url, [])
        info = await js.consumer_info(INBOUND_STREAM, INBOUND_CONSUMER)
        assert info.num_redelivered == 0
    finally:
        await nc.close()
