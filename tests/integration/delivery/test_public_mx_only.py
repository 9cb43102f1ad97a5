"""delivery.public_mx_only: a recipient domain, chosen by any sender, must not steer delivery
into the operator's own network (server-side request forgery on port 25). Every MX address
that is not public is skipped, noted, and not counted against the MX address limit; when no
MX host is left, the message bounces 5.4.4 as for a host that does not exist.

No public address is reachable from the tests: where an attempt has to get through, one
loopback sink stands in for a public MX (an address check that lets that one address pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Bounced, Deferred, Delivered
from services.delivery.connections import ConnectionPool
from services.delivery.public_addresses import why_not_public
from services.delivery.sending import MX_ADDRESS_LIMIT, AttemptResult
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import attempt, resolver_of
from tests.support.dns_server import DNSServer
from tests.support.relais import asubmit, message, wait_for_events

NO_PUBLIC_ADDRESS = (550, "5.4.4")
STAND_IN = "127.0.0.2"  # the sink that plays a public MX
UNREACHABLE = "127.0.0.39"  # nothing listens there: connection refused


def public_but_the_stand_in(address: str) -> str | None:
    return None if address == STAND_IN else why_not_public(address)


@pytest.fixture
async def pool(sink_port: int) -> AsyncIterator[ConnectionPool]:
    pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False, connect_timeout=5.0))  # type: ignore[arg-type]
    yield pool
    await pool.close()


async def _send(
    dns_server: DNSServer, pool: ConnectionPool, mx_hosts: list[str], **options: object
) -> AttemptResult:
    return await attempt(pool, resolver_of(dns_server), mx_hosts, "r@inside.test", "inside.test", **options)


async def test_every_mx_address_on_loopback_bounces_without_a_connection(
    dns_server: DNSServer, make_sink, pool: ConnectionPool
) -> None:
    sinks = [make_sink(f"127.0.0.{i}") for i in (2, 3, 4, 5)]
    dns_server.add("mx1.inside.test", "A", "127.0.0.2", "127.0.0.3")
    dns_server.add("mx2.inside.test", "A", "127.0.0.4")
    # An MX target that is an IP literal (router.mx_ip_literals) is checked the same way.
    mx_hosts = ["mx1.inside.test", "mx2.inside.test", "127.0.0.5"]

    result = await _send(dns_server, pool, mx_hosts, address_check=why_not_public)

    (outcome,) = result.outcomes
    assert isinstance(outcome, Bounced), outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == NO_PUBLIC_ADDRESS
    assert outcome.reply.command == "DNS", "Relais' own decision, not a remote reply"
    assert all(host in outcome.reply.text for host in mx_hosts), outcome.reply.text
    assert "mx1.inside.test[127.0.0.3]: skipped, loopback" in result.notes, result.notes
    assert "127.0.0.5[127.0.0.5]: skipped, loopback" in result.notes, result.notes
    await asyncio.sleep(0.2)
    assert [s.connections for s in sinks] == [0, 0, 0, 0]


async def test_skipped_addresses_do_not_count_against_the_address_limit(
    dns_server: DNSServer, make_sink, pool: ConnectionPool
) -> None:
    sink = make_sink(STAND_IN)
    skipped = [f"127.0.0.{i}" for i in range(31, 31 + MX_ADDRESS_LIMIT + 1)]
    dns_server.add("mx1.inside.test", "A", *skipped)
    dns_server.add("mx2.inside.test", "A", STAND_IN)

    result = await _send(
        dns_server, pool, ["mx1.inside.test", "mx2.inside.test"], address_check=public_but_the_stand_in
    )

    (outcome,) = result.outcomes
    assert isinstance(outcome, Delivered), (outcome, result.notes)
    assert (result.mx_host, result.address) == ("mx2.inside.test", STAND_IN)
    assert sorted(n for n in result.notes if "skipped" in n) == sorted(
        f"mx1.inside.test[{a}]: skipped, loopback" for a in skipped
    )
    assert sink.connections == 1 and len(sink.messages) == 1


async def test_a_skipped_host_and_a_public_one_that_fails_defers_naming_the_skipped_host(
    dns_server: DNSServer, pool: ConnectionPool
) -> None:
    dns_server.add("mx1.inside.test", "A", "10.0.0.25")
    dns_server.add("mx2.inside.test", "A", STAND_IN)  # stands in for a public MX that is down

    result = await _send(
        dns_server, pool, ["mx1.inside.test", "mx2.inside.test"], address_check=public_but_the_stand_in
    )

    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.is_transient, outcome
    assert "no public address: mx1.inside.test" in outcome.reply.text, outcome.reply.text
    assert "mx1.inside.test[10.0.0.25]: skipped, private" in result.notes


@pytest.mark.parametrize("mx", ["mx.alpha.test.", "127.0.0.2."], ids=["name", "ip-literal"])
async def test_with_the_setting_on_mail_to_a_loopback_mx_bounces(
    make_stack, make_sink, zone: DNSServer, mx: str
) -> None:
    zone.add("inside.test", "MX", f"10 {mx}")
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"public_mx_only": True})
    assert (await asubmit(stack.smtp_address, recipients=["r@inside.test"], data=message()))[0] == 250
    bounced = await wait_for_events(stack.config.nats.url, "bounced", 1)
    (event,) = [e for e in bounced if e.recipients == ["r@inside.test"]]
    assert (event.reply["code"], event.reply["enhanced"]) == NO_PUBLIC_ADDRESS
    assert sink.connections == 0 and sink.messages == []


async def test_with_the_setting_off_mail_to_a_loopback_mx_is_delivered(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"public_mx_only": False})
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250
    (received,) = await sink.async_wait_for(1)
    assert received.rcpt_tos == ["r@alpha.test"]
