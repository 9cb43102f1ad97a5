"""A routing pass that comes back after a crash (the router died between storing a job's fate and
acking its message) runs on another replica, which may decide the job otherwise: the DNS answer
changed, or failed. Whatever the first pass stored must stay the job's only fate.

Both passes here are real routers on real NATS and real DNS; only the crash between them is
left out, as `route` is what a redelivered message runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from services.core.bus import Bus
from services.core.config import Config
from services.core.outcome import DNS_TEMPFAIL
from services.core.runtime import start_bus
from services.core.topology import DELIVER_STREAM, ROUTE_STREAM, deliver_subject, verdict_subject
from services.router.service import RouterService
from tests.support.dns_server import DNSServer
from tests.support.relais import an_envelope, read_events, wait_for_events

DOMAIN = "flaky.test"


@pytest.fixture
def flaky(zone: DNSServer) -> DNSServer:
    zone.add(DOMAIN, "MX", f"10 mx.{DOMAIN}.")
    zone.add(f"mx.{DOMAIN}", "A", "127.0.0.5")
    return zone


@pytest.fixture
async def config(make_stack) -> Config:
    stack = await make_stack(services=())  # the topology, and a configuration for our routers
    return stack.config


@pytest.fixture
async def bus(config: Config) -> AsyncIterator[Bus]:
    bus = await start_bus(config, "test-passes", attempts=5)
    try:
        yield bus
    finally:
        with contextlib.suppress(Exception):
            await bus.close()


async def _stored(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_pass_repeated_while_dns_fails_does_not_also_defer_a_stored_job(
    flaky: DNSServer, config: Config, bus: Bus
) -> None:
    message = an_envelope(f"a@{DOMAIN}")
    await RouterService(config, bus).route(message)
    assert await _stored(bus.js, DELIVER_STREAM, deliver_subject("default")) == 1

    flaky.set_servfail(DOMAIN)
    await RouterService(config, bus).route(message)  # another replica, its DNS cache cold

    # Deferred as well, the job would be retried after its delivery: the mail sent twice.
    assert await _stored(bus.js, ROUTE_STREAM, "relais.retry.route.>") == 0
    assert await _stored(bus.js, DELIVER_STREAM, verdict_subject()) == 0
    assert not [e for e in await read_events(config.nats.url) if e.kind == "deferred"]


async def test_a_pass_repeated_once_dns_answers_does_not_also_deliver_a_deferred_job(
    flaky: DNSServer, config: Config, bus: Bus, make_stack
) -> None:
    flaky.set_servfail(DOMAIN)
    message = an_envelope(f"a@{DOMAIN}")
    await RouterService(config, bus).route(message)

    flaky.set_servfail(DOMAIN, enabled=False)
    await RouterService(config, bus).route(message)
    # Its retry will deliver it: a delivery job now as well would be a second copy.
    assert await _stored(bus.js, DELIVER_STREAM, deliver_subject("default")) == 0

    await make_stack(services=("router",))  # carries out the first pass's verdict
    (deferred,) = await wait_for_events(config.nats.url, "deferred", 1)
    assert deferred.reply is not None and deferred.reply["enhanced"] == DNS_TEMPFAIL.enhanced_status
    assert await _stored(bus.js, ROUTE_STREAM, "relais.retry.route.>") == 1
    assert await _stored(bus.js, DELIVER_STREAM, deliver_subject("default")) == 0
