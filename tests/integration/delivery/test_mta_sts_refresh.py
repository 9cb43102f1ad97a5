"""A cached MTA-STS policy is refreshed before it expires (RFC 8461 3.3: "MTAs SHOULD proactively
refresh cached policies before they expire"), even while the TXT id stays the same. Without it
a policy lapses max_age after it was first fetched however often the domain gets mail, and
whoever can block the policy host at that moment (section 10.2) has the domain's mail go with
opportunistic TLS, or none. A refresh that fails leaves the cached policy in force."""

from __future__ import annotations

import asyncio

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery.mta_sts import MtaSts
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import LITERAL, PolicyServer, text_plain

MAX_AGE = 4  # seconds: refreshed after half of it
POLICY = f"version: STSv1\r\nmode: enforce\r\nmx: *.example.test\r\nmax_age: {MAX_AGE}\r\n"


async def test_a_policy_in_use_is_refreshed_before_it_expires(
    dns_server: DNSServer, pki: TestPKI, policy_server: PolicyServer
) -> None:
    dns_server.add("_mta-sts.example.test", "TXT", "v=STSv1; id=1;")
    policy_server.routes["/example.test"] = text_plain(POLICY.encode())
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"]))
    sts = MtaSts(resolver, url_template=policy_server.url(LITERAL), context=pki.client_context(), timeout=2.0)

    first = await sts.policy("example.test")
    assert first is not None and first.mode == "enforce"
    assert await sts.policy("example.test") == first
    assert len(policy_server.requests) == 1, "a young policy is not fetched again"

    await asyncio.sleep(MAX_AGE / 2 + 0.5)  # past half its age: refreshed, the TXT id unchanged
    assert await sts.policy("example.test") == first
    assert len(policy_server.requests) == 2

    # The policy host goes away (or someone blocks it) past the first fetch's max_age: the
    # refreshed policy is still in force, and the failed refresh is not a downgrade.
    policy_server.routes["/example.test"] = (404, {}, b"")
    await asyncio.sleep(MAX_AGE / 2 + 0.3)
    assert await sts.policy("example.test") == first
    assert len(policy_server.requests) == 3, "refreshed again, and that failed"
    assert await sts.policy("example.test") == first
    assert len(policy_server.requests) == 3, "a failed refresh is not tried again at once"
