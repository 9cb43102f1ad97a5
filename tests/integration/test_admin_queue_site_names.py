"""`relais requeue` and `relais bounce-queue` name a site or domain as an operator writes it: a
domain in U-labels, upper case or with a trailing dot is the A-label domain the router stored
(`domain_key`), and an empty name, such as an unset shell variable, is refused instead of
matching every job deferred before MX resolution (those have no site yet)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.admin import queue
from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.schedule import publish_at
from services.core.topology import (
    BOUNCE_STREAM,
    ROUTE_STREAM,
    route_retry_subject,
    route_subject,
)
from tests.integration.test_admin_cli_nats_failures import relais
from tests.support.relais import an_envelope

HOUR = 3600.0


async def defer(
    bus: Bus, rcpt: str, domain: str, *, site: str = "", job_id: str = "j-0", mx_hosts: tuple[str, ...] = ()
) -> None:
    """A job the router deferred (a DNS failure: no site yet; else routed to `site` through
    `mx_hosts`), as its retry schedule stores it."""
    env = an_envelope(rcpt, domain=domain, site=site, job_id=job_id, mx_hosts=mx_hosts)
    await publish_at(
        bus,
        schedule_subject=route_retry_subject(env.key, 1),
        target_subject=route_subject(),
        payload=env.to_msgpack(),
        at=time.time() + HOUR,
    )


async def stored(bus: Bus, stream: str, subject: str) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def fired(bus: Bus) -> None:
    """Until the requeued job is on the router's subject (a guard, not a measure: due now, it
    fires within a second)."""
    for _ in range(300):
        if await stored(bus, ROUTE_STREAM, route_subject()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the requeued job did not fire")


@pytest.mark.parametrize("spelling", ["bücher.test", "BÜCHER.Test."])
async def test_requeue_finds_an_idn_domain_however_it_is_written(
    topology_bus: Bus, nats_server: EmbeddedNats, spelling: str
) -> None:
    await defer(topology_bus, "r@xn--bcher-kva.test", "xn--bcher-kva.test")
    done = relais("requeue", spelling, nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"1 deferred job(s) for {spelling} requeued" in done.stdout, done.stdout
    await fired(topology_bus)


async def test_bounce_queue_finds_an_idn_domain_written_in_u_labels(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    await defer(topology_bus, "r@xn--bcher-kva.test", "xn--bcher-kva.test")
    done = relais("bounce-queue", "Bücher.test.", "--reason", "closed", nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 deferred job(s) for Bücher.test. bounced" in done.stdout, done.stdout
    assert await stored(topology_bus, BOUNCE_STREAM, ">") == 1


@pytest.mark.parametrize("command", [("requeue",), ("bounce-queue", "--reason", "oops")])
@pytest.mark.parametrize("site", ["", "  "])
async def test_an_empty_site_is_refused_and_touches_nothing(
    topology_bus: Bus, nats_server: EmbeddedNats, command: tuple[str, ...], site: str
) -> None:
    # `relais bounce-queue "$SITE"` with SITE unset: jobs deferred before MX resolution have no
    # site, and an empty name matched every one of them, for every domain.
    await defer(topology_bus, "a@alpha.test", "alpha.test", job_id="j-0")
    await defer(topology_bus, "b@beta.test", "beta.test", job_id="j-1")
    done = relais(command[0], site, *command[1:], nats_url=nats_server.url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("relais: "), done.stderr
    assert len([job async for job in queue.scheduled_jobs(topology_bus)]) == 2
    assert await stored(topology_bus, BOUNCE_STREAM, ">") == 0
    assert await stored(topology_bus, ROUTE_STREAM, route_subject()) == 0
