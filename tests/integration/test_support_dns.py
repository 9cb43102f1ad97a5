"""The test DNS server answers real resolvers over UDP and TCP like an authoritative server."""

from __future__ import annotations

import subprocess
import sys

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.dns_server import NEGATIVE_TTL, DNSServer

# A 4096-bit DKIM key: far over 255 bytes (several strings) and over 512 bytes (TC on UDP).
DKIM_TXT = "v=DKIM1; k=rsa; p=" + "MIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEA" * 17


def resolver_for(server: DNSServer, lifetime: float = 3.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.cache = None
    return resolver


async def test_mx_a_and_aaaa(dns_server: DNSServer) -> None:
    dns_server.add("example.test", "MX", "20 mx2.example.test.", "10 mx1.example.test")
    dns_server.add("mx1.example.test", "A", "127.0.0.2")
    dns_server.add("mx1.example.test", "AAAA", "::1")
    resolver = resolver_for(dns_server)

    mx = await resolver.resolve("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    assert mx.response.flags & dns.flags.AA
    assert [r.address for r in await resolver.resolve("mx1.example.test", "A")] == ["127.0.0.2"]
    assert [r.address for r in await resolver.resolve("mx1.example.test", "AAAA")] == ["::1"]
    assert ("example.test", "MX") in dns_server.queries


async def test_names_are_case_insensitive_with_optional_trailing_dot(dns_server: DNSServer) -> None:
    dns_server.add("MX1.Example.TEST.", "A", "127.0.0.2")
    answer = await resolver_for(dns_server).resolve("mx1.example.test.", "A")
    assert answer[0].address == "127.0.0.2"


async def test_unicode_names_are_stored_as_idna(dns_server: DNSServer) -> None:
    dns_server.add("münchen.test", "MX", "10 mx.münchen.test")
    resolver = resolver_for(dns_server)
    answer = await resolver.resolve("xn--mnchen-3ya.test", "MX")
    assert answer[0].exchange.to_text() == "mx.xn--mnchen-3ya.test."
    assert (await resolver.resolve("münchen.test", "MX"))[0].preference == 10
    assert dns_server.queries[-1] == ("xn--mnchen-3ya.test", "MX")


async def test_unknown_name_is_nxdomain_with_soa(dns_server: DNSServer) -> None:
    dns_server.add("example.test", "A", "127.0.0.2")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver_for(dns_server).resolve("nope.example.test", "A")

    query = dns.message.make_query("nope.example.test", "A")
    response = await dns.asyncquery.udp(query, dns_server.host, timeout=2, port=dns_server.port)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.test."
    assert soa.ttl == soa[0].minimum == NEGATIVE_TTL


async def test_other_type_only_is_nodata(dns_server: DNSServer) -> None:
    dns_server.add("mx1.example.test", "A", "127.0.0.2")
    dns_server.add("sel._domainkey.example.test", "TXT", "v=DKIM1; p=")
    resolver = resolver_for(dns_server)
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx1.example.test", "AAAA")
    # An empty non-terminal exists: NODATA, not NXDOMAIN.
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("_domainkey.example.test", "TXT")


async def test_cname_is_followed(dns_server: DNSServer) -> None:
    dns_server.add("mail.example.test", "CNAME", "mx1.example.test")
    dns_server.add("mx1.example.test", "A", "127.0.0.2")
    answer = await resolver_for(dns_server).resolve("mail.example.test", "A")
    assert answer.canonical_name.to_text() == "mx1.example.test."
    assert [r.address for r in answer] == ["127.0.0.2"]
    with pytest.raises(ValueError, match="CNAME"):
        dns_server.add("mail.example.test", "A", "127.0.0.3")


async def test_remove(dns_server: DNSServer) -> None:
    dns_server.add("mx1.example.test", "A", "127.0.0.2")
    dns_server.add("mx1.example.test", "AAAA", "::1")
    resolver = resolver_for(dns_server)
    dns_server.remove("mx1.example.test", "AAAA")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("mx1.example.test", "AAAA")
    dns_server.remove("mx1.example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("mx1.example.test", "A")


async def test_servfail_per_name_and_for_all(dns_server: DNSServer) -> None:
    dns_server.add("a.test", "A", "127.0.0.2")
    dns_server.add("b.test", "A", "127.0.0.3")
    resolver = resolver_for(dns_server)
    dns_server.set_servfail("a.test")
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("a.test", "A")
    assert (await resolver.resolve("b.test", "A"))[0].address == "127.0.0.3"

    dns_server.set_servfail(None)
    with pytest.raises(dns.resolver.NoNameservers):
        await resolver.resolve("b.test", "A")
    dns_server.set_servfail(None, enabled=False)
    dns_server.set_servfail("a.test", enabled=False)
    assert (await resolver.resolve("a.test", "A"))[0].address == "127.0.0.2"


async def test_drop_makes_queries_time_out(dns_server: DNSServer) -> None:
    dns_server.add("a.test", "A", "127.0.0.2")
    dns_server.set_drop(True)
    with pytest.raises(dns.exception.Timeout):
        await resolver_for(dns_server, lifetime=0.5).resolve("a.test", "A")
    assert ("a.test", "A") in dns_server.queries
    dns_server.set_drop(False)
    assert (await resolver_for(dns_server).resolve("a.test", "A"))[0].address == "127.0.0.2"


async def test_tcp_query(dns_server: DNSServer) -> None:
    dns_server.add("example.test", "MX", "10 mx1.example.test.")
    query = dns.message.make_query("example.test", "MX")
    response = await dns.asyncquery.tcp(query, dns_server.host, timeout=2, port=dns_server.port)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer[0][0].exchange.to_text() == "mx1.example.test."


async def test_long_txt_round_trips_via_tcp_fallback(dns_server: DNSServer) -> None:
    dns_server.add("sel._domainkey.example.test", "TXT", DKIM_TXT)

    query = dns.message.make_query("sel._domainkey.example.test", "TXT")
    udp = await dns.asyncquery.udp(query, dns_server.host, timeout=2, port=dns_server.port)
    assert udp.flags & dns.flags.TC, "over 512 bytes without EDNS must be truncated"

    # The resolver retries the truncated answer over TCP.
    answer = await resolver_for(dns_server).resolve("sel._domainkey.example.test", "TXT")
    (rdata,) = answer
    assert len(rdata.strings) > 1 and all(len(s) <= 255 for s in rdata.strings)
    assert b"".join(rdata.strings).decode() == DKIM_TXT


async def test_explicit_txt_strings(dns_server: DNSServer) -> None:
    dns_server.add("example.test", "TXT", '"v=spf1 " "-all"')
    (rdata,) = await resolver_for(dns_server).resolve("example.test", "TXT")
    assert rdata.strings == (b"v=spf1 ", b"-all")


async def test_ptr(dns_server: DNSServer) -> None:
    dns_server.add("2.0.0.127.in-addr.arpa", "PTR", "mx1.example.test.")
    answer = await resolver_for(dns_server).resolve_address("127.0.0.2")
    assert answer[0].target.to_text() == "mx1.example.test."


def test_sync_resolver_and_restart_on_same_port() -> None:
    with DNSServer() as server:
        server.add("a.test", "A", "127.0.0.2")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = 2
        assert resolver.resolve("a.test", "A")[0].address == "127.0.0.2"

        port = server.port
        server.stop()
        with pytest.raises(dns.exception.Timeout):
            resolver.resolve("a.test", "A", lifetime=0.3)
        server.start()
        assert server.port == port
        assert resolver.resolve("a.test", "A")[0].address == "127.0.0.2"


def test_subprocess_sees_the_records(dns_server: DNSServer) -> None:
    dns_server.add("a.test", "A", "127.0.0.7")
    code = (
        "import sys, dns.resolver\n"
        "r = dns.resolver.Resolver(configure=False)\n"
        "r.nameservers = [sys.argv[1]]; r.port = int(sys.argv[2])\n"
        "print(r.resolve('a.test', 'A', lifetime=5)[0].address)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, dns_server.host, str(dns_server.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "127.0.0.7"
