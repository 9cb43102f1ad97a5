"""The MTA-STS policy cache is bounded: every domain mail goes to leaves its policy (up to
MAX_POLICY_BYTES of mx patterns) in a worker's memory, so a policy past its max_age, which is
never used again, is dropped, and at the cap the policy fetched longest ago goes first. A live
policy under the cap is used as before, without a new fetch."""

from __future__ import annotations

import asyncio

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery import mta_sts
from services.delivery.mta_sts import MtaSts
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import LITERAL, PolicyServer, text_plain

CAP = 3


def _publish(dns_server: DNSServer, policy_server: PolicyServer, domain: str, max_age: int) -> None:
    dns_server.add(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1;")
    policy = f"version: STSv1\r\nmode: enforce\r\nmx: *.{domain}\r\nmax_age: {max_age}\r\n"
    policy_server.routes[f"/{domain}"] = text_plain(policy.encode())


def _fetches(policy_server: PolicyServer, domain: str) -> int:
    return sum(path == f"/{domain}" for _host, path in policy_server.requests)


async def test_expired_policies_go_first_then_the_oldest_at_the_cap(
    dns_server: DNSServer, pki: TestPKI, policy_server: PolicyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mta_sts, "_CACHE_MAX", CAP)
    _publish(dns_server, policy_server, "short.test", max_age=1)
    for name in ("one", "two", "three", "four"):
        _publish(dns_server, policy_server, f"{name}.test", max_age=86400)
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"]))
    sts = MtaSts(resolver, url_template=policy_server.url(LITERAL), context=pki.client_context(), timeout=2.0)

    for domain in ("short.test", "one.test", "two.test"):
        assert (await sts.policy(domain)) is not None
    await asyncio.sleep(1.5)  # short.test's policy is past its max_age
    assert (await sts.policy("three.test")) is not None
    assert sorted(sts._cache) == ["one.test", "three.test", "two.test"], "the expired one went, not one.test"

    assert (await sts.policy("four.test")) is not None
    assert sorted(sts._cache) == ["four.test", "three.test", "two.test"], "at the cap the oldest went"

    # The live policies kept are used as before: no new fetch.
    for domain in ("two.test", "three.test", "four.test"):
        assert (await sts.policy(domain)) is not None
        assert _fetches(policy_server, domain) == 1, domain
    # The dropped one is fetched again when mail goes there, and the cache stays at the cap.
    assert (await sts.policy("one.test")) is not None
    assert _fetches(policy_server, "one.test") == 2
    assert len(sts._cache) == CAP
