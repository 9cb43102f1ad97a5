"""MTA-STS enforce: the policy is fetched over HTTPS (loopback, test PKI) and enforced."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.policy_hosts import LITERAL, PolicyServer, text_plain
from tests.support.relais import asubmit, message, wait_for_events

POLICIES = {
    "alpha.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.alpha.test\r\nmax_age: 86400\r\n",
    # The test certificate names *.example.test, so this domain's MX can present a valid one.
    "example.test": "version: STSv1\r\nmode: enforce\r\nmx: *.example.test\r\nmax_age: 86400\r\n",
}


@pytest.fixture
def policy_server(policy_server: PolicyServer) -> PolicyServer:
    """The conftest's policy host, serving POLICIES."""
    policy_server.routes.update({f"/{domain}": text_plain(p.encode()) for domain, p in POLICIES.items()})
    return policy_server


@pytest.fixture
def sts_zone(zone):
    zone.add("example.test", "MX", "10 mx.example.test.")
    zone.add("mx.example.test", "A", "127.0.0.3")
    for domain in POLICIES:
        zone.add(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=20261201;")
    return zone


async def test_enforced_policy_with_a_mismatched_certificate_is_deferred_not_delivered(
    make_stack, make_sink, pki, policy_server, sts_zone
) -> None:
    sink = make_sink("127.0.0.2", tls_context=pki.wrong_server_context())
    stack = await make_stack(
        delivery={"mta_sts_url": policy_server.url(LITERAL), "tls_ca_file": str(pki.ca_pem)}
    )
    assert (await asubmit(stack.smtp_address, recipients=["x@alpha.test"], data=message()))[0] == 250
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 2)
    assert all(e.reply["enhanced"] == "4.7.5" for e in deferred), [e.reply for e in deferred]
    assert "/alpha.test" in [path for _, path in policy_server.requests]
    await asyncio.sleep(0.5)
    assert sink.messages == [] and sink.data_commands == 0, "nothing crossed the unverified connection"


async def test_enforced_policy_with_a_valid_certificate_delivers_over_verified_tls(
    make_stack, make_sink, pki, policy_server, sts_zone
) -> None:
    sink = make_sink("127.0.0.3", tls_context=pki.server_context())
    stack = await make_stack(
        delivery={"mta_sts_url": policy_server.url(LITERAL), "tls_ca_file": str(pki.ca_pem)}
    )
    assert (await asubmit(stack.smtp_address, recipients=["y@example.test"], data=message()))[0] == 250
    (got,) = await sink.async_wait_for(1)
    assert got.tls
    (event,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert event.tls_version
