"""A Relais stack for router scenarios: loopback DNS zone, MX sinks, sources on 127.0.0.1x.

Zone:
  acme.test, brand.test   sender domains (MX -> 127.0.0.9, where DSNs land)
  alpha.test  MX 10 mx.alpha.test (127.0.0.2)
  beta.test   MX 10 mx.beta.test  (127.0.0.3)
  gamma.test  MX 10 mx.gamma.test (127.0.0.4)

Sinks listen on 127.0.0.2-9; sources (the pools' IPs) are 127.0.0.11 and up, so a sink's peer
address names the source a message left from.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from tests.support.dns_server import DNSServer
from tests.support.relais import (
    ACCOUNT,
    PASSWORD,
    SENDER_DOMAIN,
    SERVICES,
    RelaisStack,
    make_config,
    password_hash,
)

DOMAINS = {"alpha.test": "127.0.0.2", "beta.test": "127.0.0.3", "gamma.test": "127.0.0.4"}
SENDER_MX = "127.0.0.9"
BRAND_DOMAIN = "brand.test"


@pytest.fixture
def zone(dns_server: DNSServer) -> DNSServer:
    for sender in (SENDER_DOMAIN, BRAND_DOMAIN):
        dns_server.add(sender, "MX", f"10 mx.{sender}.")
        dns_server.add(f"mx.{sender}", "A", SENDER_MX)
    for domain, ip in DOMAINS.items():
        dns_server.add(domain, "MX", f"10 mx.{domain}.")
        dns_server.add(f"mx.{domain}", "A", ip)
    return dns_server


def account(pool: str = "default", pools: Sequence[str] = ()) -> dict[str, AccountConfig]:
    """The test account, owning both sender domains."""
    return {
        ACCOUNT: AccountConfig(
            password_hash=password_hash(), domains=[SENDER_DOMAIN, BRAND_DOMAIN], pool=pool, pools=list(pools)
        )
    }


@pytest.fixture
def make_stack(nats_server: EmbeddedNats, zone: DNSServer, sink_port: int) -> Callable[..., Any]:
    """make_stack(services=(...), **config sections) -> a started RelaisStack, stopped at teardown."""
    stacks: list[RelaisStack] = []

    async def make(services: Sequence[str] = SERVICES, **sections: Any):
        config = make_config(nats_url=nats_server.url, dns_port=zone.port, smtp_port=sink_port, **sections)
        stack = RelaisStack(config)
        stacks.append(stack)
        await stack.start(services)
        return stack

    make.stacks = stacks  # type: ignore[attr-defined]
    return make


@pytest.fixture(autouse=True)
async def _stop_made_stacks(make_stack: Callable[..., Any]) -> AsyncIterator[None]:
    yield
    for s in make_stack.stacks:  # type: ignore[attr-defined]
        await s.stop()


def submit_many(address: tuple[str, int], messages: Sequence[tuple[str, Sequence[str], bytes]]) -> list[int]:
    """Send many messages in one authenticated session (one scrypt check, not one per message)."""
    codes = []
    with smtplib.SMTP(*address, timeout=60) as client:
        client.ehlo("client.test")
        client.login(ACCOUNT, PASSWORD)
        for sender, recipients, data in messages:
            refused = client.sendmail(sender, list(recipients), data)
            assert not refused, refused
            codes.append(250)
    return codes


async def asubmit_many(
    address: tuple[str, int], messages: Sequence[tuple[str, Sequence[str], bytes]]
) -> list[int]:
    return await asyncio.to_thread(submit_many, address, messages)
