"""A running Relais (four services in-process) wired to a loopback DNS zone and MX sinks.

Zone:
  acme.test        MX 10 mx.acme.test (127.0.0.9)  - the sender's own domain: DSNs land here
  alpha.test       MX 10 mx.alpha.test (127.0.0.2)
  beta.test        MX 10 mx.beta.test (127.0.0.3)
  gamma.test       MX 10 mx.gamma.test (127.0.0.4)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from services.core.embedded import EmbeddedNats
from tests.support.dns_server import DNSServer
from tests.support.relais import SERVICES, RelaisStack, make_config
from tests.support.smtp_sink import SMTPSink

DOMAINS = {"alpha.test": "127.0.0.2", "beta.test": "127.0.0.3", "gamma.test": "127.0.0.4"}
SENDER_MX = "127.0.0.9"


@pytest.fixture
def zone(dns_server: DNSServer) -> DNSServer:
    dns_server.add("acme.test", "MX", "10 mx.acme.test.")
    dns_server.add("mx.acme.test", "A", SENDER_MX)
    for domain, ip in DOMAINS.items():
        dns_server.add(domain, "MX", f"10 mx.{domain}.")
        dns_server.add(f"mx.{domain}", "A", ip)
    return dns_server


@pytest.fixture
def sender_mx(make_sink: Callable[..., SMTPSink]) -> SMTPSink:
    return make_sink(SENDER_MX)


@pytest.fixture
def make_stack(nats_server: EmbeddedNats, zone: DNSServer, sink_port: int) -> Callable[..., Any]:
    stacks: list[RelaisStack] = []

    async def make(services: tuple[str, ...] = SERVICES, **sections: Any) -> RelaisStack:
        config = make_config(nats_url=nats_server.url, dns_port=zone.port, smtp_port=sink_port, **sections)
        stack = RelaisStack(config)
        stacks.append(stack)
        await stack.start(services)
        return stack

    make.stacks = stacks  # type: ignore[attr-defined]
    return make


@pytest.fixture
async def stack(make_stack: Callable[..., Any]) -> AsyncIterator[RelaisStack]:
    s = await make_stack()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture(autouse=True)
async def _stop_made_stacks(make_stack: Callable[..., Any]) -> AsyncIterator[None]:
    yield
    for s in make_stack.stacks:  # type: ignore[attr-defined]
        await s.stop()
