"""A mail loop ends: a domain whose MX is Relais itself, reached from a relay network, used to
queue and deliver the same message for ever (1,578 times in 8 s in the review's run). After
MAX_HOPS Received: fields the ingress refuses it with 554 5.4.6, and the sender gets a DSN."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.ingress.policy import MAX_HOPS
from tests.support.dns_server import DNSServer
from tests.support.relais import ACCOUNT, asubmit, message, wait_for_events
from tests.support.smtp_sink import SMTPSink


async def test_a_message_that_loops_back_to_relais_is_bounced(
    make_stack: Callable[..., Any], zone: DNSServer, sink_port: int, sender_mx: SMTPSink
) -> None:
    zone.add("loop.test", "MX", "10 mx.loop.test.")
    zone.add("mx.loop.test", "A", "127.0.0.1")
    stack = await make_stack(
        ingress={
            # Delivery's MX port, on the address loop.test's MX names: Relais delivers to itself,
            # from 127.0.0.1, which the relay network lets in without AUTH.
            "listen": f"127.0.0.1:{sink_port}",
            "hostname": "relais.test",
            "relay_networks": ["127.0.0.0/8"],
            "relay_networks_account": ACCOUNT,
        }
    )
    code, _ = await asubmit(stack.smtp_address, recipients=["victim@loop.test"], data=message())
    assert code == 250

    [bounced] = await wait_for_events(stack.config.nats.url, "bounced", 1, timeout=60)
    assert bounced.reply is not None and bounced.reply["enhanced"] == "5.4.6", bounced.reply
    accepted = await wait_for_events(stack.config.nats.url, "accepted", 1)
    # The submission, then one acceptance per hop until the Received: fields pass the limit.
    assert len(accepted) <= MAX_HOPS + 2, len(accepted)
    [dsn] = await asyncio.to_thread(sender_mx.wait_for, 1, 30)
    assert b"5.4.6" in dsn.data
