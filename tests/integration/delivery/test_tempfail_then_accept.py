"""A sink that tempfails N times then accepts: retried, delivered once, every attempt an event."""

from __future__ import annotations

import asyncio

from tests.integration.delivery.conftest import SOURCE_A
from tests.support.relais import asubmit, message, read_events, wait_for_events


async def test_tempfail_twice_then_accept(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 2
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["t@alpha.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1, timeout=30)
    assert got.rcpt_tos == ["t@alpha.test"]
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 2)
    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert [e.attempt for e in deferred] == [1, 2]
    for event in [*deferred, delivered]:
        assert event.source_ip == SOURCE_A
        assert event.mx_host == "mx.alpha.test" and event.mx_address == "127.0.0.2"
        assert event.duration_ms >= 0 and event.reply is not None
        assert event.recipients == ["t@alpha.test"] and event.message_id == delivered.message_id
    assert [e.reply["code"] for e in deferred] == [451, 451]
    assert delivered.reply["code"] == 250 and delivered.attempt == 3, "the third attempt"
    await asyncio.sleep(2.5)  # longer than a retry interval: nothing else may arrive
    assert len(sink.messages) == 1
    assert sink.data_commands == 3
    assert not [e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"]
