"""delivery.public_mx_only and MTA-STS: the policy fetch goes to https://mta-sts.<recipient
domain>, so it is a request into the operator's network too when that name resolves there.
With the setting on, a policy host without a public address is not asked (a failed fetch: no
policy, or the cached one), and the fetch connects to the address that was checked (TLS name
and Host header still the policy host's name), never to a second, possibly different, answer.
"""

from __future__ import annotations

import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig
from services.delivery.mta_sts import MtaSts
from services.delivery.public_addresses import why_not_public
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import LITERAL, NAMED, PolicyServer, text_plain
from tests.support.relais import asubmit, message, wait_for_events

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: *.example.test\r\nmax_age: 86400\r\n"
# A name both the test zone and the system resolver (which the unchecked fetch uses) know.
LOCALHOST = "https://localhost:{port}/{domain}"


@pytest.fixture
def policy_server(policy_server: PolicyServer) -> PolicyServer:
    """The conftest's policy host, serving POLICY for example.test."""
    policy_server.routes["/example.test"] = text_plain(POLICY.encode())
    return policy_server


def _sts(dns_server: DNSServer, pki: TestPKI, url: str, **options: object) -> MtaSts:
    resolver = relais_dns.make_resolver(DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"]))
    return MtaSts(resolver, url_template=url, context=pki.client_context(), timeout=2.0, **options)  # type: ignore[arg-type]


@pytest.fixture
def inside_zone(dns_server: DNSServer) -> DNSServer:
    dns_server.add("_mta-sts.example.test", "TXT", "v=STSv1; id=1;")
    dns_server.add("mta-sts.example.test", "A", "127.0.0.1")
    dns_server.add("localhost", "A", "127.0.0.1")
    return dns_server


@pytest.mark.parametrize("template", [LOCALHOST, LITERAL], ids=["named", "ip-literal"])
async def test_a_policy_host_on_loopback_is_not_fetched(
    inside_zone: DNSServer,
    pki: TestPKI,
    policy_server: PolicyServer,
    template: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = policy_server.url(template)
    sts = _sts(inside_zone, pki, url, address_check=why_not_public)
    assert await sts.policy("example.test") is None
    assert await sts.policy("example.test") is None, "remembered as a failed fetch"
    assert policy_server.connections == 0 and policy_server.requests == []
    assert "no public address (127.0.0.1: loopback)" in caplog.text

    # The same policy host is fetched when public addresses are not required.
    control = _sts(inside_zone, pki, url)
    assert (await control.policy("example.test")) is not None
    assert [path for _, path in policy_server.requests] == ["/example.test"]


async def test_the_fetch_connects_to_the_checked_address_under_the_policy_host_name(
    inside_zone: DNSServer, pki: TestPKI, policy_server: PolicyServer
) -> None:
    # 127.0.0.1 stands in for a public address. Only the test zone knows mta-sts.example.test,
    # so reaching the server at all shows the fetch did not resolve the name a second time.
    sts = _sts(
        inside_zone,
        pki,
        policy_server.url(NAMED),
        address_check=lambda a: None if a == "127.0.0.1" else why_not_public(a),
    )
    policy = await sts.policy("example.test")
    assert policy is not None and policy.mode == "enforce"
    assert policy_server.server_names == ["mta-sts.example.test"], "SNI names the policy host"
    port = policy_server.server_address[1]
    assert policy_server.requests == [(f"mta-sts.example.test:{port}", "/example.test")]


async def test_the_delivery_service_does_not_fetch_from_a_loopback_policy_host(
    make_stack, make_sink, zone: DNSServer, policy_server: PolicyServer
) -> None:
    zone.add("_mta-sts.alpha.test", "TXT", "v=STSv1; id=1;")
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"public_mx_only": True, "mta_sts_url": policy_server.url(LITERAL)})
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250
    await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert policy_server.connections == 0
    assert sink.connections == 0
