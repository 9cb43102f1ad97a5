"""A temporary DNS failure's reply names the query and the kind of failure, as Postfix's "Name
service error for name=x type=MX: Host not found, try again" does, never the resolver: the text
reaches senders (DSN Diagnostic-Code, delay warnings) and webhooks, and the resolver's address
is the operator's business. The full dnspython error stays in the service's log."""

from __future__ import annotations

import logging

import pytest

from services.bounce.classify import BounceCategory, classify
from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.router.mx import resolve_mx
from tests.support.dns_server import DNSServer


def _resolver(server: DNSServer, timeout: float = 2.0):
    return relais_dns.make_resolver(DnsConfig(servers=[f"{server.host}:{server.port}"], timeout=timeout))


def _assert_no_resolver_in(text: str, server: DNSServer) -> None:
    assert server.host not in text and str(server.port) not in text and "@" not in text, text


async def test_servfail_names_the_query_not_the_resolver(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.add("flaky.test", "MX", "10 mx.flaky.test.")
    dns_server.set_servfail("flaky.test")
    with caplog.at_level(logging.INFO, logger=relais_dns.__name__):
        route = await resolve_mx(_resolver(dns_server), "flaky.test")
    failure = route.failure
    assert failure is not None and failure.is_transient
    assert "name=flaky.test type=MX: SERVFAIL" in failure.text, failure.text
    _assert_no_resolver_in(failure.text, dns_server)
    assert classify(failure.code, failure.enhanced_status, failure.text) is BounceCategory.DNS_FAILURE
    # The operator still sees which server answered what.
    assert f"{dns_server.host}@{dns_server.port} answered SERVFAIL" in caplog.text, caplog.text


async def test_a_timeout_names_the_query_not_the_resolver(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.set_drop(True)
    with caplog.at_level(logging.INFO, logger=relais_dns.__name__):
        route = await resolve_mx(_resolver(dns_server, timeout=0.5), "slow.test")
    failure = route.failure
    assert failure is not None and failure.is_transient
    assert "name=slow.test type=MX: timeout" in failure.text, failure.text
    _assert_no_resolver_in(failure.text, dns_server)
    assert classify(failure.code, failure.enhanced_status, failure.text) is BounceCategory.DNS_FAILURE
    assert f"{dns_server.host}@{dns_server.port}" in caplog.text, caplog.text


async def test_an_mx_hosts_failed_lookup_names_its_query(dns_server: DNSServer) -> None:
    # Delivery's address lookups raise the same error; its text is what a deferral's notes show.
    dns_server.set_servfail("mx.flaky.test")
    with pytest.raises(relais_dns.DnsTemporaryError) as raised:
        await relais_dns.host_addresses(_resolver(dns_server), "mx.flaky.test")
    text = str(raised.value)
    assert text.startswith("Name service error for name=mx.flaky.test type=") and text.endswith(
        ": SERVFAIL"
    ), text
    _assert_no_resolver_in(str(raised.value), dns_server)
