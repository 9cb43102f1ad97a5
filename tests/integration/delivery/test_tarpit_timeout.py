"""A tarpitting MX: each reply is waited for up to `delivery.command_timeout`, but the one after
the message's final dot up to `delivery.data_done_timeout` (longer: giving up there may mean the
MX took the message and the retry sends it twice). Past its timeout the connection is dropped
and the job deferred with 4.4.2; the retry delivers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Deferred
from services.delivery.smtp_session import SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.raw_smtp import ReadsSlowly, StopsReadingAfter354, serving
from tests.support.relais import asubmit, message, wait_for_events

CONNECTION_LOST = (451, "4.4.2")


async def test_a_stall_after_the_dot_times_out_at_data_done_and_the_retry_delivers(
    make_stack, make_sink
) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 6.0  # aiosmtpd's DATA handler runs after the final dot
    sink.data_reply = "451 4.3.0 too late anyway"  # what the tarpit says once it wakes up
    stack = await make_stack(delivery={"command_timeout": 1.0, "data_done_timeout": 2.5})
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250

    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1, timeout=30)
    assert (deferred.reply["code"], deferred.reply["enhanced"]) == CONNECTION_LOST
    assert "timed out" in deferred.reply["text"].lower() or "timeout" in deferred.reply["text"].lower()
    assert 2500 <= deferred.duration_ms < 6000, "waited data_done_timeout, not command_timeout nor the tarpit"
    sink.delay_data = 0.0
    sink.data_reply = None

    (got,) = await sink.async_wait_for(1, timeout=30)
    assert got.rcpt_tos == ["slow@alpha.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert sink.connections >= 2, "the timed-out connection was not reused"


async def test_a_reply_after_the_dot_slower_than_any_command_is_still_waited_for(
    make_stack, make_sink
) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 2.0
    stack = await make_stack(delivery={"command_timeout": 1.0, "data_done_timeout": 5.0})
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250

    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1, timeout=30)
    assert delivered.duration_ms >= 2000
    assert delivered.attempt == 1, "delivered at the first attempt, not after a deferral"
    (got,) = sink.messages
    assert got.rcpt_tos == ["slow@alpha.test"] and sink.connections == 1


async def test_a_stall_at_another_command_still_times_out_at_command_timeout(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_rcpt = 4.0
    stack = await make_stack(delivery={"command_timeout": 1.0, "data_done_timeout": 30.0})
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250

    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1, timeout=30)
    assert (deferred.reply["code"], deferred.reply["enhanced"]) == CONNECTION_LOST
    assert 1000 <= deferred.duration_ms < 4000, "the RCPT reply is a command's: command_timeout"
    assert sink.data_commands == 0
    sink.delay_rcpt = 0.0
    await sink.async_wait_for(1, timeout=30)


@pytest.fixture
async def stops_reading() -> AsyncIterator[StopsReadingAfter354]:
    async with serving(StopsReadingAfter354) as start:
        yield await start()


async def test_a_transfer_that_makes_no_progress_times_out_at_command_timeout(stops_reading) -> None:
    # The long wait is for the reply after the dot only: a body the MX does not even read is
    # given up at command_timeout, as Postfix's smtp_data_xfer_timeout does.
    settings = SessionSettings(
        port=stops_reading.port, starttls=False, command_timeout=1.0, data_done_timeout=30.0
    )
    conn = await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), settings, TlsPolicy())
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 32_000  # 32 MB: more than socket buffers
    started = time.monotonic()
    try:
        result = await conn.transact("a@acme.test", ["x@b.test"], body)
    finally:
        await conn.close()
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and result.broken, outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == CONNECTION_LOST
    # Given up at command_timeout: about 1 s, a few more on a loaded machine (the 32 MB are
    # written meanwhile). Timed as the reply after the dot, the transfer would have gone on
    # once the MX read again (after its pause), and the MX closes only after 10 s of silence.
    elapsed = time.monotonic() - started
    assert elapsed < stops_reading.pause + 5.0, "the transfer was timed as a reply after the dot"
    # Given up means dropped: a plain close() would first send the rest of the message, holding
    # the socket and the buffered megabytes for as long as the server stalls.
    await asyncio.sleep(stops_reading.pause + 1.0)
    assert stops_reading.received < len(body) // 2


async def test_a_slow_transfer_that_makes_progress_is_not_cut_off() -> None:
    # About 2.5 MB/s: the 16 MB message takes well over command_timeout, moving all the while.
    async with serving(ReadsSlowly) as start:
        server = await start()
        settings = SessionSettings(port=server.port, starttls=False, command_timeout=1.0)
        conn = await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), settings, TlsPolicy())
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000
        started = time.monotonic()
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], body)
        finally:
            await conn.close()
    assert [o.kind for o in result.outcomes] == ["delivered"], result
    assert time.monotonic() - started > settings.command_timeout, "too fast to show anything"
    assert server.received == len(body) + 3
