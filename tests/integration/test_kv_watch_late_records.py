"""Everything that reads a KV bucket's stored values reads all of them, also when they reach the
client after nats-py's "end of stored values" marker, as they can on a loaded machine
(nats-io/nats.py#842). A proxy in front of the real nats-server makes that order certain:

- a delivery worker starting up knows a stored pause before it takes a job (it sent mail from a
  paused site before);
- `relais pause list`, `relais suppression list` and `relais account list` list what is stored
  (they said nothing was).

Keys outside a filtered read are not waited for: a filter matching nothing ends at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats
from nats.js import JetStreamContext

from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.kv_watch import stored
from services.core.pause import PauseState
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import (
    ACCOUNTS_BUCKET,
    DELIVERY_CONTROL_BUCKET,
    SUPPRESSION_BUCKET,
    kv_stream,
)
from services.delivery.control import DeliveryControl
from services.ingress.accounts import list_accounts, seed_accounts
from tests.support.nats_delay_proxy import DelayingNatsProxy
from tests.support.relais import ACCOUNT, make_config

# Long enough for nats-py's consumer info (held a quarter as long) to come back first.
LATE = 0.8
T = TypeVar("T")


async def through_late_proxy(url: str, bucket: str, read: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """What `read` gives on a connection whose watch deliveries of `bucket` come late."""
    async with DelayingNatsProxy(url, kv_stream(bucket), LATE) as proxy:
        nc = await nats.connect(proxy.url)
        try:
            async with asyncio.timeout(20):  # a guard against a hang, not a measure
                return await read(nc.jetstream())
        finally:
            await nc.close()


async def test_a_starting_delivery_worker_knows_a_stored_pause(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    await PauseState(topology_bus.js).pause("site", "alpha.test", reason="incident")

    async def worker_holds_the_site(js: JetStreamContext) -> bool:
        control = DeliveryControl(js)
        await control.start(asyncio.Event())
        try:
            return control.paused("site", "alpha.test")
        finally:
            await control.stop()

    assert await through_late_proxy(nats_server.url, DELIVERY_CONTROL_BUCKET, worker_holds_the_site)

    async def listed(js: JetStreamContext) -> list[str]:
        return [p.name for p in await PauseState(js).paused()]

    assert await through_late_proxy(nats_server.url, DELIVERY_CONTROL_BUCKET, listed) == ["alpha.test"]


async def test_a_filtered_read_finds_its_keys_and_ends_at_once_when_none_match(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    suppression = SuppressionList(topology_bus.js)
    await suppression.add(Suppression("acme", "a@alpha.test", "manual", at=1.0))
    await suppression.add(Suppression("acme2", "b@beta.test", "manual", at=2.0))

    async def of_acme(js: JetStreamContext) -> list[str]:
        return [s.address for s in await SuppressionList(js).list("acme")]

    assert await through_late_proxy(nats_server.url, SUPPRESSION_BUCKET, of_acme) == ["a@alpha.test"]

    async def of_nobody(js: JetStreamContext) -> list[object]:
        return list(await stored(js, SUPPRESSION_BUCKET, "nobody.*"))

    assert await through_late_proxy(nats_server.url, SUPPRESSION_BUCKET, of_nobody) == []


async def test_account_list_lists_the_stored_accounts(topology_bus: Bus, nats_server: EmbeddedNats) -> None:
    kv = await topology_bus.js.key_value(ACCOUNTS_BUCKET)
    await seed_accounts(kv, make_config(nats_url=nats_server.url).accounts)

    async def names(js: JetStreamContext) -> list[str]:
        return list(await list_accounts(js))

    assert await through_late_proxy(nats_server.url, ACCOUNTS_BUCKET, names) == [ACCOUNT]
