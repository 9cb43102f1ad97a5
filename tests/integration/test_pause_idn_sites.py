"""`relais pause site` and `relais resume site` take a site as an operator writes it: a domain in
U-labels, upper case or with a trailing dot is paused under the A-label name the router gives
the site (`domain_key`), which is the name delivery workers look it up by. `relais pause site
bücher.test` was refused as no valid site name."""

from __future__ import annotations

import asyncio

from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.pause import PauseState
from services.delivery.control import DeliveryControl
from tests.integration.test_admin_cli_nats_failures import relais

SITE = "xn--bcher-kva.test"  # bücher.test, as the router stores the site of its jobs


async def worker_sees_paused(bus: Bus, site: str) -> bool:
    """Whether a delivery worker starting now holds the site's mail (it reads every pause first)."""
    control = DeliveryControl(bus.js)
    await control.start(asyncio.Event())
    try:
        return control.paused("site", site)
    finally:
        await control.stop()


async def test_a_site_paused_in_u_labels_holds_the_routers_a_label_site(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    done = relais("pause", "site", "bücher.test", "--reason", "incident 7", nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"paused site {SITE}", done.stdout

    assert await worker_sees_paused(topology_bus, SITE)
    listed = await PauseState(topology_bus.js).paused()
    assert [(p.kind, p.name, p.reason) for p in listed] == [("site", SITE, "incident 7")]

    done = relais("resume", "site", "BÜCHER.Test.", nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"resumed site {SITE}", done.stdout
    assert not await worker_sees_paused(topology_bus, SITE)
    assert await PauseState(topology_bus.js).paused() == []
