"""A recipient domain whose DNS answers SERVFAIL is deferred (4.4.3), not bounced, and is
delivered once its DNS recovers: the failure was never cached."""

from __future__ import annotations

from services.core.outcome import DNS_TEMPFAIL
from tests.integration.router.conftest import asubmit_many
from tests.support.relais import SENDER_DOMAIN, message, read_events, wait_for_events


async def test_servfail_defers_then_delivers_after_recovery(make_stack, make_sink, zone) -> None:
    zone.add("flaky.test", "MX", "10 mx.flaky.test.")
    zone.add("mx.flaky.test", "A", "127.0.0.5")
    zone.set_servfail("flaky.test")
    stack = await make_stack()
    sink = make_sink("127.0.0.5")
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["f@flaky.test"], message())])
    (deferred, *_) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.reply is not None and deferred.reply["enhanced"] == DNS_TEMPFAIL.enhanced_status
    # What senders and webhooks read names the query, not the resolver.
    assert "name=flaky.test type=MX: SERVFAIL" in deferred.reply["text"]
    assert f"@{zone.port}" not in deferred.reply["text"]
    assert sink.messages == []
    zone.set_servfail("flaky.test", enabled=False)
    (got,) = await sink.async_wait_for(1, timeout=30)
    assert got.rcpt_tos == ["f@flaky.test"]
    kinds = {e.kind for e in await read_events(stack.config.nats.url)}
    assert "bounced" not in kinds
