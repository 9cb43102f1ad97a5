"""DNSServer answers built without sockets, and the tier marker hook."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.support.dns_server import NEGATIVE_TTL, DNSServer


def ask(server: DNSServer, name: str, rdtype: str) -> dns.message.Message:
    response = server.build_response(dns.message.make_query(name, rdtype))
    assert response is not None
    return response


def test_cname_chain_to_missing_target_is_nxdomain_with_the_cname() -> None:
    server = DNSServer()
    server.add("www.example.test", "CNAME", "gone.example.test.")
    response = ask(server, "www.example.test", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert [r.rdtype for r in response.answer] == [dns.rdatatype.CNAME]


def test_cname_loop_is_servfail() -> None:
    server = DNSServer()
    server.add("a.test", "CNAME", "b.test")
    server.add("b.test", "CNAME", "a.test")
    assert ask(server, "a.test", "A").rcode() == dns.rcode.SERVFAIL


def test_cname_query_returns_the_cname_itself() -> None:
    server = DNSServer()
    server.add("www.example.test", "CNAME", "host.example.test")
    (rrset,) = ask(server, "www.example.test", "CNAME").answer
    assert rrset[0].target.to_text() == "host.example.test."


def test_nodata_carries_negative_soa_and_aa() -> None:
    server = DNSServer()
    server.add("example.test", "A", "127.0.0.2")
    response = ask(server, "example.test", "MX")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert response.flags & dns.flags.AA
    assert response.authority[0][0].minimum == NEGATIVE_TTL


def test_ttl_and_record_set_growth() -> None:
    server = DNSServer()
    server.add("example.test", "MX", "10 mx1.example.test.", ttl=300)
    server.add("example.test", "MX", "20 mx2.example.test.", ttl=300)
    (rrset,) = ask(server, "example.test", "MX").answer
    assert rrset.ttl == 300 and len(rrset) == 2


def test_txt_is_split_into_255_byte_strings() -> None:
    server = DNSServer()
    value = "x" * 600
    server.add("t.test", "TXT", value)
    (rrset,) = ask(server, "t.test", "TXT").answer
    assert [len(s) for s in rrset[0].strings] == [255, 255, 90]


def test_add_rejects_unknown_types_and_empty_rdata() -> None:
    server = DNSServer()
    with pytest.raises(ValueError):
        server.add("a.test", "A")
    with pytest.raises(ValueError, match="NOPE"):
        server.add("a.test", "NOPE", "x")


def test_this_module_is_marked_unit(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("integration") is None
