"""An MX host that does not exist (NXDOMAIN for its address), or exists without an A or AAAA
record, is "Host not found": when every MX host of the route is, the message bounces 5.4.4 at
once, as Postfix and Exim do; when some other host may still answer (or a lookup failed), it is
deferred, and the deferral names the hosts that were not found. A route holds only the best
MAX_MX_HOSTS hosts of a domain, so one holding that many may have left out a host with an address:
it is deferred too, never bounced on the hosts it holds alone."""

from __future__ import annotations

from collections.abc import Callable

from services.core.envelope import MAX_MX_HOSTS
from services.core.outcome import Bounced, Deferred
from services.delivery.connections import ConnectionPool
from services.delivery.sending import AttemptResult
from services.delivery.smtp_session import SessionSettings
from services.router.mx import resolve_mx
from tests.integration.delivery.conftest import attempt, resolver_of
from tests.support.dns_server import DNSServer
from tests.support.relais import asubmit, message, wait_for_events
from tests.support.smtp_sink import SMTPSink

HOST_NOT_FOUND = (550, "5.4.4")
UNREACHABLE = "127.0.0.39"  # nothing listens there: connection refused


async def _send(dns_server: DNSServer, sink_port: int, mx_hosts: list[str]) -> AttemptResult:
    pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False, connect_timeout=5.0))  # type: ignore[arg-type]
    try:
        return await attempt(pool, resolver_of(dns_server), mx_hosts, "r@gone.test", "gone.test")
    finally:
        await pool.close()


async def test_every_mx_host_not_found_bounces(dns_server: DNSServer, sink_port: int) -> None:
    result = await _send(dns_server, sink_port, ["mx1.gone.test", "mx2.gone.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Bounced), outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == HOST_NOT_FOUND
    assert "mx1.gone.test" in outcome.reply.text and "mx2.gone.test" in outcome.reply.text


async def test_one_host_not_found_and_one_unreachable_defers_naming_it(
    dns_server: DNSServer, sink_port: int
) -> None:
    dns_server.add("mx2.gone.test", "A", UNREACHABLE)
    result = await _send(dns_server, sink_port, ["mx1.gone.test", "mx2.gone.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.is_transient, outcome
    assert "host not found: mx1.gone.test" in outcome.reply.text


async def test_every_mx_host_without_an_address_bounces(dns_server: DNSServer, sink_port: int) -> None:
    # The names exist (they have other records), but no A or AAAA: Postfix's "Host found but no
    # data record of type A" bounce. Retrying finds nothing until the domain's DNS changes.
    dns_server.add("mx1.gone.test", "TXT", "exists, without an address")
    dns_server.add("mx2.gone.test", "TXT", "exists, without an address")
    result = await _send(dns_server, sink_port, ["mx1.gone.test", "mx2.gone.test", "mx3.gone.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Bounced), outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == HOST_NOT_FOUND
    assert "mx1.gone.test, mx2.gone.test has no address record" in outcome.reply.text
    assert "mx3.gone.test does not exist" in outcome.reply.text


async def test_a_dns_failure_defers_even_beside_hosts_without_an_address(
    dns_server: DNSServer, sink_port: int
) -> None:
    # A soft error dominates: the failed lookup may yet give an address (Postfix does the same).
    dns_server.add("mx1.gone.test", "TXT", "exists, without an address")
    dns_server.set_servfail("mx2.gone.test")
    result = await _send(dns_server, sink_port, ["mx1.gone.test", "mx2.gone.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.is_transient, outcome
    assert "no address record: mx1.gone.test" in outcome.reply.text


async def test_a_dns_failure_alone_defers(dns_server: DNSServer, sink_port: int) -> None:
    dns_server.set_servfail("mx1.gone.test")
    result = await _send(dns_server, sink_port, ["mx1.gone.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.is_transient, outcome


def _hosts_without_an_address(dns_server: DNSServer, count: int, *, worst: str = "") -> None:
    """`count` MX hosts of gone.test (mx00..), each existing without an A or AAAA record; with
    `worst`, one more MX host, the least preferred, at that address."""
    records = [f"{10 + i} mx{i:02d}.gone.test." for i in range(count)]
    for i in range(count):
        dns_server.add(f"mx{i:02d}.gone.test", "TXT", "exists, without an address")
    if worst:
        records.append(f"{10 + count} last.gone.test.")
        dns_server.add("last.gone.test", "A", worst)
    dns_server.add("gone.test", "MX", *records)


async def test_a_route_cut_short_whose_hosts_have_no_address_defers(
    dns_server: DNSServer, sink_port: int, make_sink: Callable[..., SMTPSink]
) -> None:
    # Postfix looks every MX name up before applying smtp_mx_address_limit, so it would deliver
    # to last.gone.test; the route holds only the best MAX_MX_HOSTS, which cannot tell.
    sink = make_sink("127.0.0.5")
    _hosts_without_an_address(dns_server, MAX_MX_HOSTS, worst="127.0.0.5")
    route = await resolve_mx(resolver_of(dns_server), "gone.test")
    assert len(route.hosts) == MAX_MX_HOSTS and "last.gone.test" not in route.hosts
    result = await _send(dns_server, sink_port, list(route.hosts))
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.is_transient, outcome
    assert "no address record: mx00.gone.test" in outcome.reply.text
    assert f"any MX hosts after the best {MAX_MX_HOSTS} not looked up" in outcome.reply.text
    assert sink.messages == []


async def test_a_route_of_fewer_hosts_than_the_cap_without_an_address_bounces(
    dns_server: DNSServer, sink_port: int
) -> None:
    _hosts_without_an_address(dns_server, MAX_MX_HOSTS - 1)
    route = await resolve_mx(resolver_of(dns_server), "gone.test")
    assert len(route.hosts) == MAX_MX_HOSTS - 1, "every MX host of the domain is in the route"
    result = await _send(dns_server, sink_port, list(route.hosts))
    (outcome,) = result.outcomes
    assert isinstance(outcome, Bounced), outcome
    assert (outcome.reply.code, outcome.reply.enhanced_status) == HOST_NOT_FOUND


async def test_a_route_to_a_missing_host_bounces_with_a_dsn(make_stack, make_sink, zone: DNSServer) -> None:
    zone.add("gone.test", "MX", "10 mx.nowhere.test.")
    sender_mx = make_sink("127.0.0.9")
    stack = await make_stack()
    code, _ = await asubmit(stack.smtp_address, recipients=["r@gone.test"], data=message())
    assert code == 250
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["r@gone.test"]
    assert (bounced.reply["code"], bounced.reply["enhanced"]) == HOST_NOT_FOUND
    (dsn,) = await sender_mx.async_wait_for(1)
    assert b"mx.nowhere.test" in dsn.data
