"""MX answers at the edges, end to end: a "." among other MX hosts, and an MX host that does not
exist ahead of one that does.

A "." anywhere in the MX RRset is taken as a null MX (RFC 7505), as Postfix takes it: its
dns_get_answer() turns any MX record with an empty exchange into DNS_NULLMX for the whole
lookup, whatever its preference and whatever else the RRset holds. RFC 7505 forbids other MX
records beside it, so such a domain is misconfigured, and Relais follows the reference MTA
rather than guess which half the owner meant.
"""

from __future__ import annotations

import asyncio

from services.core.outcome import NULL_MX
from tests.integration.router.conftest import SENDER_MX
from tests.support.dns_server import DNSServer
from tests.support.relais import asubmit, message, read_events, wait_for_events

STANDBY = "127.0.0.5"  # an MX sink that must never be connected to


async def test_a_dot_among_other_mx_hosts_bounces_as_a_null_mx_without_an_attempt(
    make_stack, make_sink, zone: DNSServer
) -> None:
    zone.add("mixed.test", "MX", "10 mx.mixed.test.", "20 .")
    zone.add("mx.mixed.test", "A", STANDBY)
    standby, sender_mx = make_sink(STANDBY), make_sink(SENDER_MX)
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["r@mixed.test"], data=message()))[0] == 250

    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["r@mixed.test"]
    assert bounced.reply is not None
    assert (bounced.reply["code"], bounced.reply["enhanced"]) == (NULL_MX.code, NULL_MX.enhanced_status)
    (dsn,) = await sender_mx.async_wait_for(1)
    assert b"5.1.10" in dsn.data and b"r@mixed.test" in dsn.data
    assert standby.connections == 0 and standby.messages == [], "a null MX gets no delivery attempt"


async def test_an_mx_host_that_does_not_exist_is_passed_over_for_the_next(
    make_stack, make_sink, zone: DNSServer
) -> None:
    # gone.patchy.test has no record at all (NXDOMAIN); the second MX host answers.
    zone.add("patchy.test", "MX", "10 gone.patchy.test.", "20 mx.patchy.test.")
    zone.add("mx.patchy.test", "A", STANDBY)
    sink = make_sink(STANDBY)
    stack = await make_stack()
    assert (await asubmit(stack.smtp_address, recipients=["r@patchy.test"], data=message()))[0] == 250

    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == ["r@patchy.test"]
    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert delivered.mx_host == "mx.patchy.test"
    await asyncio.sleep(1.0)
    kinds = {e.kind for e in await read_events(stack.config.nats.url)}
    assert not kinds & {"bounced", "deferred", "expired"}, kinds
