"""A tarpitting MX: the command timeout fires, the connection is dropped, the job is retried."""

from __future__ import annotations

from tests.support.relais import asubmit, message, wait_for_events


async def test_tarpit_times_out_and_the_retry_delivers(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 4.0
    sink.data_reply = "451 4.3.0 too late anyway"  # what the tarpit says once it wakes up
    stack = await make_stack(delivery={"command_timeout": 1.0})
    assert (await asubmit(stack.smtp_address, recipients=["slow@alpha.test"], data=message()))[0] == 250

    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1, timeout=30)
    assert deferred.reply["code"] == 451 and deferred.reply["enhanced"] == "4.4.2"
    assert "timed out" in deferred.reply["text"].lower() or "timeout" in deferred.reply["text"].lower()
    assert deferred.duration_ms < 4000, "the client gave up before the tarpit answered"
    sink.delay_data = 0.0
    sink.data_reply = None

    (got,) = await sink.async_wait_for(1, timeout=30)
    assert got.rcpt_tos == ["slow@alpha.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert sink.connections >= 2, "the timed-out connection was not reused"
