"""An idle connection opened under a weaker TLS policy is not reused for a domain whose MTA-STS
policy enforces verified TLS: two recipient domains with the same MX host (as every domain hosted
by one provider), the first without a policy or with a site's require-TLS rule, the second with
an enforced one. The MX host's certificate decides, on a connection of the second's own."""

from __future__ import annotations

import pytest

from services.core.outcome import Deferred, Delivered
from services.delivery.connections import ConnectionPool
from services.delivery.sending import AttemptResult, send_job
from services.delivery.shaping import Limits
from services.delivery.smtp_session import Source
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.conftest import resolver_of
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer

MX = "mx.example.test"  # named by the test certificate (*.example.test)
MX_ADDRESS = "127.0.0.3"
ENFORCE = TlsPolicy(require=True, verify=True, mx_patterns=("*.example.test",), origin="mta-sts")
WEAKER = [TlsPolicy(), TlsPolicy(require=True, origin="site")]


async def _send(
    pool: ConnectionPool, dns_server: DNSServer, policy: TlsPolicy, recipient: str
) -> AttemptResult:
    return await send_job(
        pool,
        resolver_of(dns_server),
        [MX],
        sender="a@acme.test",
        recipients=[recipient],
        body=b"Subject: x\r\n\r\nhello\r\n",
        source=Source("", "relais.test"),
        site="example.test",
        limits=Limits(connections=0),
        policy=policy,
    )


@pytest.mark.parametrize("weaker", WEAKER, ids=["opportunistic", "site-require"])
async def test_an_unverified_connection_is_not_reused_under_an_enforced_policy(
    tls_pool: ConnectionPool, dns_server: DNSServer, make_sink, pki: TestPKI, weaker: TlsPolicy
) -> None:
    dns_server.add(MX, "A", MX_ADDRESS)
    sink = make_sink(MX_ADDRESS, tls_context=pki.wrong_server_context())  # for wrong.example
    first = await _send(tls_pool, dns_server, weaker, "a@hosted.test")
    assert isinstance(first.outcomes[0], Delivered), first.outcomes
    enforced = await _send(tls_pool, dns_server, ENFORCE, "b@example.test")
    (outcome,) = enforced.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.enhanced_status == "4.7.5", outcome
    assert [m.rcpt_tos for m in sink.messages] == [["a@hosted.test"]], "nothing went over the idle one"


async def test_a_verified_connection_serves_both_policies(
    tls_pool: ConnectionPool, dns_server: DNSServer, make_sink, pki: TestPKI
) -> None:
    dns_server.add(MX, "A", MX_ADDRESS)
    sink = make_sink(MX_ADDRESS, tls_context=pki.server_context())
    results = [
        await _send(tls_pool, dns_server, TlsPolicy(), "a@hosted.test"),  # opens an unverified one
        await _send(tls_pool, dns_server, ENFORCE, "b@example.test"),  # opens a verified one
        await _send(tls_pool, dns_server, TlsPolicy(), "c@hosted.test"),  # reuses the verified one
    ]
    assert all(isinstance(r.outcomes[0], Delivered) for r in results), [r.outcomes for r in results]
    assert all(m.tls for m in sink.messages)
    assert sink.connections == 2
