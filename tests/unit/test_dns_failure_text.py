"""The words a temporary DNS failure is told in: the query and the kind of failure, never the
resolver that dnspython names in its own message; and the bounce classifier files them all as
DNS failures. The errors are dnspython's own, built as its resolver builds them."""

from __future__ import annotations

import dns.exception
import dns.message
import dns.resolver
import pytest

from services.bounce.classify import BounceCategory, classify
from services.core import dns as relais_dns
from services.router.mx import dns_tempfail

RESOLVER = "Do53:10.0.0.10@53"
# (server, over TCP, port, what it answered, response), as dnspython records each try.
TIMED_OUT = (RESOLVER, False, 53, dns.exception.Timeout(), None)


def _no_nameservers(*answers: object) -> dns.resolver.NoNameservers:
    request = dns.message.make_query("example.com", "MX")
    errors = [(RESOLVER, False, 53, answer, None) for answer in answers]
    return dns.resolver.NoNameservers(request=request, errors=errors)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_no_nameservers("SERVFAIL"), "SERVFAIL"),
        (_no_nameservers("REFUSED"), "REFUSED"),
        (_no_nameservers("SERVFAIL", "SERVFAIL", "REFUSED"), "SERVFAIL, REFUSED"),
        (_no_nameservers(dns.exception.Timeout(timeout=2.0)), "timeout"),
        (_no_nameservers(ConnectionRefusedError(111, "Connection refused")), "connection refused"),
        (_no_nameservers(dns.message.ShortHeader()), "bad answer"),
        (_no_nameservers(), "no name server to ask"),
        (
            dns.resolver.LifetimeTimeout(
                timeout=5.0, errors=[(RESOLVER, False, 53, dns.exception.Timeout())]
            ),
            "timeout",
        ),
        (dns.resolver.YXDOMAIN(), "YXDOMAIN"),
    ],
)
def test_a_failure_is_named_by_its_kind_without_the_resolver(
    error: dns.exception.DNSException, kind: str
) -> None:
    failure = relais_dns.temporary_error("example.com", "MX", error)
    assert str(failure) == f"Name service error for name=example.com type=MX: {kind}"
    assert "10.0.0.10" not in str(failure)


@pytest.mark.parametrize("kind", ["SERVFAIL", "REFUSED", "timeout", "connection refused", "bad answer"])
def test_the_router_reply_is_filed_as_a_dns_failure(kind: str) -> None:
    error = relais_dns.DnsTemporaryError("example.com", "MX", kind)
    reply = dns_tempfail(error)
    assert (reply.code, reply.enhanced_status) == (451, "4.4.3")
    assert classify(reply.code, reply.enhanced_status, reply.text) is BounceCategory.DNS_FAILURE
    # As a DSN's Diagnostic-Code carries it: one unsplit line.
    assert classify(None, None, str(reply)) is BounceCategory.DNS_FAILURE
