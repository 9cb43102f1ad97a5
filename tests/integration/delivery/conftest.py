"""A Relais stack for delivery scenarios: loopback DNS zone, MX sinks, source IPs, shaping files.

Zone:
  acme.test    MX 10 mx.acme.test  (127.0.0.9)  - the sender's domain: DSNs land here
  alpha.test   MX 10 mx.alpha.test (127.0.0.2)  - the router names its site "alpha.test"
  beta.test    MX 10 mx.beta.test  (127.0.0.3)

Sinks listen on 127.0.0.2-9; the pools' source IPs are 127.0.0.2x, so a sink's peer address
names the source a message left from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.asyncresolver
import pytest

from services.core import dns as relais_dns
from services.core.config import DnsConfig, PoolConfig, SourceConfig
from services.core.embedded import EmbeddedNats
from services.delivery.connections import ConnectionPool
from services.delivery.control import DeliveryControl
from services.delivery.sending import AttemptResult, send_job
from services.delivery.shaping import Limits
from services.delivery.smtp_session import SessionSettings, Source, TransactionResult, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.certs import TestPKI
from tests.support.dns_server import DNSServer
from tests.support.policy_hosts import PolicyServer, serving_policies
from tests.support.relais import SERVICES, RelaisStack, asubmit, make_config, message

DOMAINS = {"alpha.test": "127.0.0.2", "beta.test": "127.0.0.3"}
SENDER_MX = "127.0.0.9"
SOURCE_A = "127.0.0.21"
SOURCE_B = "127.0.0.22"
UNBINDABLE = "192.0.2.77"  # TEST-NET-1: never an address of this host


@pytest.fixture
def zone(dns_server: DNSServer) -> DNSServer:
    dns_server.add("acme.test", "MX", "10 mx.acme.test.")
    dns_server.add("mx.acme.test", "A", SENDER_MX)
    for domain, ip in DOMAINS.items():
        dns_server.add(domain, "MX", f"10 mx.{domain}.")
        dns_server.add(f"mx.{domain}", "A", ip)
    return dns_server


@pytest.fixture
def policy_server(pki: TestPKI) -> Iterator[PolicyServer]:
    """An MTA-STS policy host presenting the test certificate, with no routes yet."""
    with serving_policies(pki.server_context()) as server:
        yield server


@pytest.fixture
async def tls_pool(sink_port: int, pki: TestPKI) -> AsyncIterator[ConnectionPool]:
    """A connection pool that checks certificates against the test CA, with no connection cap
    (no KV): for tests of which connection a job gets."""
    settings = SessionSettings(port=sink_port, connect_timeout=5.0, tls_ca_file=str(pki.ca_pem))
    pool = ConnectionPool(None, settings)  # type: ignore[arg-type]
    yield pool
    await pool.close()


def pools(*addresses: str) -> dict[str, PoolConfig]:
    return {
        "default": PoolConfig(
            sources=[SourceConfig(address=a, ehlo=f"out-{a[-2:]}.relais.test") for a in addresses]
        )
    }


@pytest.fixture
def shaping_file(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / f"shaping-{len(list(tmp_path.glob('shaping-*')))}.toml"
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def make_stack(nats_server: EmbeddedNats, zone: DNSServer, sink_port: int) -> Any:
    """make_stack(services=(...), **config sections) -> a started RelaisStack; all stopped at teardown."""
    stacks: list[RelaisStack] = []

    async def make(services: tuple[str, ...] = SERVICES, **sections: Any):
        sections.setdefault("pools", pools(SOURCE_A))
        delivery = {
            "pause_recheck": 1.0,
            "max_shaping_wait": 5.0,
            "idle_timeout": 5.0,
            **sections.pop("delivery", {}),
        }
        config = make_config(
            nats_url=nats_server.url, dns_port=zone.port, smtp_port=sink_port, delivery=delivery, **sections
        )
        stack = RelaisStack(config)
        stacks.append(stack)
        await stack.start(services)
        return stack

    make.stacks = stacks  # type: ignore[attr-defined]
    return make


@pytest.fixture(autouse=True)
async def _stop_made_stacks(make_stack: Any) -> AsyncIterator[None]:
    yield
    for s in reversed(make_stack.stacks):
        await s.stop()


async def submit_many(stack: RelaisStack, count: int, recipient: str = "r{i}@alpha.test", **kw: Any) -> None:
    for i in range(count):
        code, _ = await asubmit(
            stack.smtp_address, recipients=[recipient.format(i=i)], data=message(subject=f"m{i}"), **kw
        )
        assert code == 250


def max_in_window(times: list[float], window: float) -> int:
    """The most arrivals within any `window` seconds (a count, not a speed)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t < start + window))
    return best


def resolver_of(dns_server: DNSServer) -> dns.asyncresolver.Resolver:
    """A resolver asking only the loopback DNS server, as a worker configured for it would."""
    return relais_dns.make_resolver(DnsConfig(servers=[f"{dns_server.host}:{dns_server.port}"], timeout=2.0))


async def one_transaction(
    settings: SessionSettings,
    body: bytes,
    recipients: Sequence[str] = ("x@b.test",),
    *,
    host: str = "127.0.0.1",
    mx: str = "mx.test",
) -> TransactionResult:
    """One transaction from a@acme.test as delivery makes it, on a connection of its own to
    `host` (at `settings.port`), closed however it ends."""
    conn = await open_connection(host, mx, Source("", "relais.test"), settings, TlsPolicy())
    try:
        return await conn.transact("a@acme.test", list(recipients), body)
    finally:
        await conn.close()


async def attempt(
    pool: ConnectionPool,
    resolver: dns.asyncresolver.Resolver,
    mx_hosts: list[str],
    recipient: str,
    site: str,
    **options: Any,
) -> AttemptResult:
    """One attempt of a one-recipient job straight through `send_job`: no NATS, no shaping.
    `options` go to `send_job` as they are (address_check, address_limit)."""
    return await send_job(
        pool,
        resolver,
        mx_hosts,
        sender="a@acme.test",
        recipients=[recipient],
        body=b"Subject: x\r\n\r\nhello\r\n",
        source=Source("", "relais.test"),
        site=site,
        limits=Limits(connections=0),
        policy=TlsPolicy(),
        **options,
    )


@contextlib.asynccontextmanager
async def running_controls(js: Any, count: int, **start: Any) -> AsyncIterator[list[DeliveryControl]]:
    """The pause and push-back control of `count` delivery workers, each watching the bucket
    (`start`: DeliveryControl.start's options); stopped on the way out."""
    stop = asyncio.Event()
    controls = [DeliveryControl(js) for _ in range(count)]
    try:
        for control in controls:
            await control.start(stop, **start)
        yield controls
    finally:
        stop.set()
        for control in controls:
            await control.stop()
