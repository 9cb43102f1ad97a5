"""MX resolution and the shared DNS cache against the real loopback DNS server.

Each test builds the resolver exactly as the services do (`make_resolver`) and points it at the
test server, then asserts on answers and on the queries the server actually saw (a cache hit
sends none).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.core.outcome import NO_SUCH_DOMAIN, NULL_MX
from services.router.mx import NO_MAIL_HOST, resolve_mx
from tests.support.dns_server import DNSServer


def _resolver(server: DNSServer, **kw: object):
    return relais_dns.make_resolver(DnsConfig(servers=[f"{server.host}:{server.port}"], timeout=2.0, **kw))  # type: ignore[arg-type]


def _count(server: DNSServer, name: str, rdtype: str) -> int:
    return sum(1 for q in server.queries if q == (name, rdtype))


async def test_mx_hosts_in_preference_order(dns_server: DNSServer) -> None:
    dns_server.add("pref.test", "MX", "30 mx3.pref.test.", "10 mx1.pref.test.", "20 mx2.pref.test.")
    route = await resolve_mx(_resolver(dns_server), "pref.test")
    assert route.hosts == ("mx1.pref.test", "mx2.pref.test", "mx3.pref.test")
    assert route.primary == ("mx1.pref.test",)


async def test_equal_preferences_come_in_random_order_even_from_the_cache(dns_server: DNSServer) -> None:
    dns_server.add("eq.test", "MX", "10 a.eq.test.", "10 b.eq.test.", "20 c.eq.test.")
    resolver = _resolver(dns_server)
    routes = [await resolve_mx(resolver, "eq.test") for _ in range(200)]
    firsts = Counter(r.hosts[0] for r in routes)
    assert set(firsts) == {"a.eq.test", "b.eq.test"} and min(firsts.values()) > 50
    assert all(r.hosts[2] == "c.eq.test" for r in routes)
    assert _count(dns_server, "eq.test", "MX") == 1, "199 answers came from the cache"


async def test_implicit_mx_when_the_domain_has_only_an_address(dns_server: DNSServer) -> None:
    dns_server.add("implicit.test", "A", "127.0.0.7")
    route = await resolve_mx(_resolver(dns_server), "implicit.test")
    assert route.hosts == ("implicit.test",) and route.failure is None


async def test_no_mx_and_no_address_is_permanent(dns_server: DNSServer) -> None:
    dns_server.add("textonly.test", "TXT", "v=spf1 -all")
    route = await resolve_mx(_resolver(dns_server), "textonly.test")
    assert route.failure == NO_MAIL_HOST and route.is_permanent_failure


async def test_null_mx_and_nxdomain_are_permanent(dns_server: DNSServer) -> None:
    dns_server.add("nullmx.test", "MX", "0 .")
    resolver = _resolver(dns_server)
    assert (await resolve_mx(resolver, "nullmx.test")).failure == NULL_MX
    nx = await resolve_mx(resolver, "nowhere.test")
    assert nx.failure == NO_SUCH_DOMAIN and nx.is_permanent_failure


async def test_servfail_is_temporary_then_the_domain_recovers(dns_server: DNSServer) -> None:
    dns_server.add("flaky.test", "MX", "10 mx.flaky.test.")
    dns_server.set_servfail("flaky.test")
    resolver = _resolver(dns_server)
    failed = await resolve_mx(resolver, "flaky.test")
    assert failed.failure is not None and failed.failure.code == 451 and not failed.is_permanent_failure
    dns_server.set_servfail("flaky.test", enabled=False)
    recovered = await resolve_mx(resolver, "flaky.test")
    assert recovered.hosts == ("mx.flaky.test",), "a SERVFAIL is never cached"


async def test_lookups_that_miss_together_share_one_query(dns_server: DNSServer) -> None:
    dns_server.add("busy.test", "MX", "10 mx.busy.test.")
    dns_server.add("mx.busy.test", "A", "127.0.0.7")
    resolver = _resolver(dns_server)
    routes = await asyncio.gather(*(resolve_mx(resolver, "busy.test") for _ in range(50)))
    hosts = await asyncio.gather(*(relais_dns.addresses(resolver, "mx.busy.test") for _ in range(50)))
    assert {r.hosts for r in routes} == {("mx.busy.test",)}
    assert hosts == [["127.0.0.7"]] * 50
    assert _count(dns_server, "busy.test", "MX") == 1
    assert _count(dns_server, "mx.busy.test", "A") == 1
    assert _count(dns_server, "mx.busy.test", "AAAA") == 1, "no data is shared too"


async def test_a_failed_shared_query_fails_for_all_and_is_asked_again_later(dns_server: DNSServer) -> None:
    dns_server.add("shaky.test", "MX", "10 mx.shaky.test.")
    dns_server.set_servfail("shaky.test")
    resolver = _resolver(dns_server)
    failed = await asyncio.gather(*(resolve_mx(resolver, "shaky.test") for _ in range(20)))
    assert all(r.failure is not None and r.failure.is_transient for r in failed)
    assert _count(dns_server, "shaky.test", "MX") == 1
    dns_server.set_servfail("shaky.test", enabled=False)
    assert (await resolve_mx(resolver, "shaky.test")).hosts == ("mx.shaky.test",)
    assert _count(dns_server, "shaky.test", "MX") == 2


async def test_a_caller_that_gives_up_leaves_the_shared_query_to_the_others(dns_server: DNSServer) -> None:
    dns_server.add("patient.test", "MX", "10 mx.patient.test.")
    resolver = _resolver(dns_server)
    impatient = asyncio.create_task(relais_dns.query(resolver, "patient.test", "MX"))
    patient = asyncio.create_task(relais_dns.query(resolver, "patient.test", "MX"))
    await asyncio.sleep(0)  # both are waiting on the one query now
    impatient.cancel()
    records = await patient
    assert [r.to_text() for r in records or []] == ["10 mx.patient.test."]
    assert impatient.cancelled()
    assert _count(dns_server, "patient.test", "MX") == 1


async def test_a_dead_resolver_is_temporary(dns_server: DNSServer) -> None:
    dns_server.add("slow.test", "MX", "10 mx.slow.test.")
    dns_server.set_drop(True)
    resolver = relais_dns.make_resolver(
        DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"], timeout=0.5)
    )
    route = await resolve_mx(resolver, "slow.test")
    assert route.failure is not None and route.failure.is_transient


async def test_answers_are_cached_for_their_ttl_then_asked_again(dns_server: DNSServer) -> None:
    dns_server.add("ttl.test", "MX", "10 old.ttl.test.", ttl=1)
    resolver = _resolver(dns_server)
    assert (await resolve_mx(resolver, "ttl.test")).hosts == ("old.ttl.test",)
    dns_server.remove("ttl.test", "MX")
    dns_server.add("ttl.test", "MX", "10 new.ttl.test.", ttl=1)
    assert (await resolve_mx(resolver, "ttl.test")).hosts == ("old.ttl.test",), "still within the TTL"
    await asyncio.sleep(1.3)
    assert (await resolve_mx(resolver, "ttl.test")).hosts == ("new.ttl.test",)
    assert _count(dns_server, "ttl.test", "MX") == 2


async def test_long_ttls_are_capped(dns_server: DNSServer) -> None:
    dns_server.add("long.test", "MX", "10 mx.long.test.", ttl=86400)
    resolver = _resolver(dns_server, cache_max_ttl=1.0)
    await resolve_mx(resolver, "long.test")
    await resolve_mx(resolver, "long.test")
    assert _count(dns_server, "long.test", "MX") == 1
    await asyncio.sleep(1.3)
    await resolve_mx(resolver, "long.test")
    assert _count(dns_server, "long.test", "MX") == 2


async def test_nxdomain_is_cached_negatively_within_the_cap(dns_server: DNSServer) -> None:
    resolver = _resolver(dns_server, negative_ttl=1.0)
    assert (await resolve_mx(resolver, "later.test")).failure == NO_SUCH_DOMAIN
    dns_server.add("later.test", "MX", "10 mx.later.test.")
    assert (await resolve_mx(resolver, "later.test")).failure == NO_SUCH_DOMAIN, "negative answer cached"
    assert _count(dns_server, "later.test", "MX") == 1
    await asyncio.sleep(1.3)
    assert (await resolve_mx(resolver, "later.test")).hosts == ("mx.later.test",)


async def test_large_answers_take_their_size_in_the_cache(dns_server: DNSServer) -> None:
    # A zone anyone can set up may answer with 64 KiB of MX records (1.25 MB once parsed), for
    # as many names as it likes. Each answer here is about 22 KB: 40-odd cache places of 512
    # octets, so a cache of 200 holds four of them, not eight (nor 200).
    domains = [f"big{n}.test" for n in range(8)]
    for domain in domains:
        dns_server.add(domain, "MX", *(f"{10 + i} m{i:04d}.{domain}." for i in range(1000)))
    dns_server.add("small.test", "MX", "10 mx.small.test.")
    resolver = _resolver(dns_server, cache_size=200)
    for domain in domains:
        assert len((await resolve_mx(resolver, domain)).hosts) == 10
    await resolve_mx(resolver, "small.test")
    asked = Counter(dns_server.queries)  # a large answer is asked twice: over UDP, then TCP

    for domain in (domains[-1], "small.test", domains[0]):
        await resolve_mx(resolver, domain)
    again = Counter(dns_server.queries) - asked
    assert again[(domains[-1], "MX")] == 0, "the latest large answer is still cached"
    assert again[("small.test", "MX")] == 0
    assert again[(domains[0], "MX")] > 0, "the oldest made room for the later ones"

    tiny = _resolver(dns_server, cache_size=20)  # smaller than one large answer
    await resolve_mx(tiny, domains[1])
    asked = Counter(dns_server.queries)
    await resolve_mx(tiny, domains[1])
    again = Counter(dns_server.queries) - asked
    assert again[(domains[1], "MX")] > 0, "an answer larger than the whole cache is not kept"


async def test_unicode_domains_are_resolved_by_their_idna_form(dns_server: DNSServer) -> None:
    dns_server.add("bücher.test", "MX", "10 mx.bücher.test.")
    route = await resolve_mx(_resolver(dns_server), "Bücher.test")
    assert route.hosts == ("mx.xn--bcher-kva.test",)
    assert ("xn--bcher-kva.test", "MX") in dns_server.queries


async def test_invalid_domain_names_are_permanent_failures(dns_server: DNSServer) -> None:
    route = await resolve_mx(_resolver(dns_server), "a" * 64 + ".test")
    assert route.is_permanent_failure


async def test_mx_target_that_is_a_cname_is_followed_to_its_address(dns_server: DNSServer) -> None:
    dns_server.add("alias.test", "MX", "10 mx.alias.test.")
    dns_server.add("mx.alias.test", "CNAME", "real.hoster.test.")
    dns_server.add("real.hoster.test", "A", "127.0.0.8")
    resolver = _resolver(dns_server)
    route = await resolve_mx(resolver, "alias.test")
    assert route.hosts == ("mx.alias.test",)
    assert await relais_dns.addresses(resolver, "mx.alias.test") == ["127.0.0.8"]


@pytest.mark.parametrize("allowed", [True, False])
async def test_mx_target_that_is_an_ip_literal(dns_server: DNSServer, allowed: bool) -> None:
    dns_server.add("literal.test", "MX", "10 127.0.0.8.")
    resolver = _resolver(dns_server)
    route = await resolve_mx(resolver, "literal.test", ip_literals=allowed)
    if allowed:
        assert route.hosts == ("127.0.0.8",)
        assert await relais_dns.addresses(resolver, route.hosts[0]) == ["127.0.0.8"]
        assert ("127.0.0.8", "A") not in dns_server.queries, "a literal needs no lookup"
    else:
        assert route.failure == NO_MAIL_HOST


async def test_at_most_ten_mx_hosts_are_kept_best_preference_first(dns_server: DNSServer) -> None:
    # 1500 records (over TCP: too big for UDP), each host its own preference, listed worst first.
    dns_server.add("many.test", "MX", *(f"{1500 + i} mx{i:04d}.many.test." for i in reversed(range(1500))))
    route = await resolve_mx(_resolver(dns_server), "many.test")
    assert route.hosts == tuple(f"mx{i:04d}.many.test" for i in range(10))
    assert route.primary == ("mx0000.many.test",)


async def test_ten_of_many_equal_best_hosts_are_kept_a_different_ten_each_time(dns_server: DNSServer) -> None:
    dns_server.add("wide.test", "MX", *(f"10 mx{i:02d}.wide.test." for i in range(30)), "5 best.wide.test.")
    resolver = _resolver(dns_server)
    routes = [await resolve_mx(resolver, "wide.test") for _ in range(50)]
    assert all(len(r.hosts) == 10 and r.hosts[0] == "best.wide.test" for r in routes)
    assert len({h for r in routes for h in r.hosts}) == 31, "the cap is taken after the shuffle"
