"""MX host names that share an address, as every Microsoft 365 tenant's
(<tenant>.mail.protection.outlook.com) and many filtering services' do: a connection to that
address serves the next message to any of those names of the same site, as Postfix reuses a
cached session by address (its endpoint key is the address, port and TLS level). A connection
that cannot serve a message (another site's, or verified for another name) is left idle for its
own, not closed; and at the site's connection cap it is closed to make room, not waited for."""

from __future__ import annotations

import pytest

from services.core.bus import connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.outcome import Delivered
from services.core.topology import ensure_topology
from services.delivery.connections import ConnectionPool
from services.delivery.limits import SharedLimits
from services.delivery.sending import AttemptResult, send_job
from services.delivery.shaping import Limits
from services.delivery.smtp_session import SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.conftest import resolver_of
from tests.integration.delivery.test_mta_sts_enforce_reuse import ENFORCE
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer

ADDRESS = "127.0.0.3"
# Both named by the test certificate (*.example.test).
MX1, MX2 = "tenant-a.example.test", "tenant-b.example.test"
UNCAPPED = Limits(connections=0, messages_per_connection=0)


@pytest.fixture
def shared(dns_server: DNSServer) -> DNSServer:
    for host in (MX1, MX2):
        dns_server.add(host, "A", ADDRESS)
    return dns_server


async def _send(
    pool: ConnectionPool,
    dns_server: DNSServer,
    host: str,
    site: str,
    *,
    limits: Limits = UNCAPPED,
    policy: TlsPolicy = TlsPolicy(),  # noqa: B008  # frozen
) -> AttemptResult:
    return await send_job(
        pool,
        resolver_of(dns_server),
        [host],
        sender="a@acme.test",
        recipients=[f"r@{host}"],
        body=b"Subject: x\r\n\r\nhello\r\n",
        source=Source("", "relais.test"),
        site=site,
        limits=limits,
        policy=policy,
    )


async def test_one_connection_serves_every_name_of_the_address(
    tls_pool: ConnectionPool, shared: DNSServer, make_sink
) -> None:
    sink = make_sink(ADDRESS)
    results = [await _send(tls_pool, shared, host, "microsoft") for host in (MX1, MX2, MX1, MX2)]
    assert all(isinstance(r.outcomes[0], Delivered) for r in results), [r.outcomes for r in results]
    # Each outcome and event names the host the job went to, whichever name opened it.
    assert [r.outcomes[0].mx_host for r in results] == [MX1, MX2, MX1, MX2]
    assert [r.mx_host for r in results] == [MX1, MX2, MX1, MX2]
    assert sink.connections == 1, "a connection to the address serves both names"


async def test_a_connection_another_job_cannot_use_stays_open_for_its_own(
    tls_pool: ConnectionPool, shared: DNSServer, make_sink, pki: TestPKI
) -> None:
    sink = make_sink(ADDRESS, tls_context=pki.server_context())
    # Another site's connection to the same address is not used (its lease is that site's).
    await _send(tls_pool, shared, MX1, "site-a.test")
    await _send(tls_pool, shared, MX2, "site-b.test")
    await _send(tls_pool, shared, MX1, "site-a.test")
    assert sink.connections == 2, "site-a's connection waited for site-a's next message"
    # One verified for MX1's name is not used under a policy that checks MX2's.
    await _send(tls_pool, shared, MX1, "enforced.test", policy=ENFORCE)
    await _send(tls_pool, shared, MX2, "enforced.test", policy=ENFORCE)
    await _send(tls_pool, shared, MX1, "enforced.test", policy=ENFORCE)
    assert sink.connections == 4, "each name's certificate checked on a connection of its own"
    assert len(sink.messages) == 6 and all(m.tls for m in sink.messages)


async def test_at_the_cap_an_idle_connection_that_does_not_fit_makes_room(
    nats_server: EmbeddedNats, shared: DNSServer, make_sink, pki: TestPKI, sink_port: int
) -> None:
    sink = make_sink(ADDRESS, tls_context=pki.server_context())
    config = Config(nats=NatsConfig(url=nats_server.url))
    bus = await connect(config.nats, "test-shared-address")
    settings = SessionSettings(port=sink_port, connect_timeout=5.0, tls_ca_file=str(pki.ca_pem))
    tls_pool = ConnectionPool(SharedLimits(bus.js), settings, lease_wait=1.0)
    one = Limits(connections=1, messages_per_connection=0)
    try:
        await ensure_topology(bus.js, config)
        first = await _send(tls_pool, shared, MX1, "capped.test", limits=one)  # unverified TLS
        # The only lease is the idle connection's, which does not satisfy an enforced policy.
        second = await _send(tls_pool, shared, MX1, "capped.test", limits=one, policy=ENFORCE)
        outcomes = [o for r in (first, second) for o in r.outcomes]
        assert [type(o) for o in outcomes] == [Delivered, Delivered], outcomes
        assert sink.connections == 2 and sink.peak_sessions == 1
    finally:
        await tls_pool.close()
        await bus.close()
