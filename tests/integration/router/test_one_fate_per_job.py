"""A routing pass that comes back after a crash (the router died between storing a job's fate and
acking its message) runs on another replica, which may decide the job otherwise: the DNS answer
changed, or failed, or the suppression list did. Whatever the first pass stored must stay the
job's only fate.

Both passes here are real routers on real NATS and real DNS; only the crash between them is
left out, as `route` is what a redelivered message runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from services.core.bus import Bus
from services.core.config import Config
from services.core.envelope import Envelope
from services.core.outcome import DNS_TEMPFAIL
from services.core.runtime import start_bus
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import DELIVER_STREAM, ROUTE_STREAM, deliver_subject, verdict_subject
from services.router.service import RouterService
from tests.support.dns_server import DNSServer
from tests.support.relais import ACCOUNT, an_envelope, read_events, wait_for_events

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


async def test_a_pass_repeated_after_its_recipient_was_suppressed_leaves_the_stored_job_alone(
    flaky: DNSServer, config: Config, bus: Bus
) -> None:
    message = an_envelope(f"a@{DOMAIN}", f"b@{DOMAIN}")
    await RouterService(config, bus).route(message)
    await SuppressionList(bus.js).add(Suppression(account=ACCOUNT, address=f"a@{DOMAIN}", reason="manual"))
    await RouterService(config, bus).route(message)

    # The stored job still sends to a@: a `suppressed` event as well would be a second outcome.
    assert await _stored(bus.js, DELIVER_STREAM, deliver_subject("default")) == 1
    assert await _stored(bus.js, DELIVER_STREAM, verdict_subject()) == 0
    assert not [e for e in await read_events(config.nats.url) if e.kind == "suppressed"]


async def test_a_pass_repeated_after_a_suppression_was_lifted_does_not_also_deliver(
    flaky: DNSServer, config: Config, bus: Bus, make_stack
) -> None:
    suppression = SuppressionList(bus.js)
    await suppression.add(Suppression(account=ACCOUNT, address=f"a@{DOMAIN}", reason="manual"))
    message = an_envelope(f"a@{DOMAIN}", f"b@{DOMAIN}")
    await RouterService(config, bus).route(message)
    await suppression.remove(ACCOUNT, f"a@{DOMAIN}")
    await RouterService(config, bus).route(message)
    assert await _stored(bus.js, DELIVER_STREAM, deliver_subject("default")) == 0

    await make_stack(services=("router",))  # carries out the first pass's verdict
    (suppressed,) = await wait_for_events(config.nats.url, "suppressed", 1)
    assert suppressed.recipients == [f"a@{DOMAIN}"]
    await _until_stored(bus.js, deliver_subject("default"))
    job = await bus.js.get_last_msg(DELIVER_STREAM, deliver_subject("default"))
    assert Envelope.from_msgpack(job.data).recipients == (f"b@{DOMAIN}",)


async def _until_stored(js: JetStreamContext, subject: str) -> None:
    for _ in range(300):
        if await _stored(js, DELIVER_STREAM, subject):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"nothing stored on {subject}")
