"""`relais requeue` and `relais bounce-queue` match a job by the site the router named (a `[sites]`
rule's name, else the registrable part of the primary MX host) or by its recipient domain, never
by an MX host: `relais requeue mx1.alpha.test` finds nothing. Finding nothing is no failure
(exit 0, as `postqueue -s` for a destination without mail), but it is said on stderr what the
name is matched against and, for a name that can only be an MX host, which site its mail is in
(the rule `relais pause site` refuses such a name by). The help no longer offers an MX host."""

from __future__ import annotations

import pytest

from services.admin import queue
from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.topology import BOUNCE_STREAM, ROUTE_STREAM, route_subject
from tests.integration.test_admin_cli_nats_failures import relais
from tests.integration.test_admin_queue_site_names import defer, fired, stored

COMMANDS = [("requeue",), ("bounce-queue", "--reason", "closed")]


async def defer_routed(bus: Bus) -> None:
    """A job routed to site alpha.test through mx1.alpha.test, waiting for its retry."""
    await defer(bus, "r@alpha.test", "alpha.test", site="alpha.test", mx_hosts=("mx1.alpha.test",))


async def untouched(bus: Bus) -> bool:
    jobs = [job async for job in queue.scheduled_jobs(bus)]
    return (
        len(jobs) == 1
        and await stored(bus, BOUNCE_STREAM, ">") == 0
        and await stored(bus, ROUTE_STREAM, route_subject()) == 0
    )


@pytest.mark.parametrize("command", COMMANDS)
async def test_an_mx_host_matches_nothing_and_says_which_site_to_name(
    topology_bus: Bus, nats_server: EmbeddedNats, command: tuple[str, ...]
) -> None:
    await defer_routed(topology_bus)
    done = relais(command[0], "mx1.alpha.test", *command[1:], nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 deferred job(s) for mx1.alpha.test" in done.stdout, done.stdout
    (hint,) = done.stderr.splitlines()
    assert hint.startswith("relais: ") and "recipient domain" in hint, hint
    assert "site alpha.test" in hint, hint
    assert await untouched(topology_bus)


@pytest.mark.parametrize("command", COMMANDS)
async def test_a_name_without_mail_says_what_it_is_matched_against(
    topology_bus: Bus, nats_server: EmbeddedNats, command: tuple[str, ...]
) -> None:
    await defer_routed(topology_bus)
    done = relais(command[0], "beta.test", *command[1:], nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    (hint,) = done.stderr.splitlines()
    assert hint.startswith("relais: ") and "recipient domain" in hint, hint
    assert "site beta" not in hint, "beta.test is a site's name, not an MX host in one"
    assert await untouched(topology_bus)


async def test_the_site_named_matches_without_a_hint(topology_bus: Bus, nats_server: EmbeddedNats) -> None:
    await defer_routed(topology_bus)
    done = relais("requeue", "alpha.test", nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 deferred job(s) for alpha.test requeued" in done.stdout, done.stdout
    assert done.stderr == ""
    await fired(topology_bus)


@pytest.mark.parametrize("command", ["requeue", "bounce-queue"])
def test_the_help_offers_no_mx_host(command: str) -> None:
    shown = relais(command, "--help", nats_url="nats://127.0.0.1:1")
    assert shown.returncode == 0, shown.stderr
    assert "MX host (site)" not in shown.stdout and "recipient domain" in shown.stdout, shown.stdout
