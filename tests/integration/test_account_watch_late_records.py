"""A replica's first complete view of the account records holds every record stored before it
started watching, also when those records reach it after nats-py's "end of stored values"
marker, as they can on a loaded machine (nats-io/nats.py#842): the server sends them and the
consumer's info from different goroutines, and the info, counting nothing pending, may arrive
first. A proxy in front of the real nats-server makes that order certain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from services.core.account_watch import AccountWatch
from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from services.core.runtime import start_bus
from services.core.topology import ACCOUNTS_BUCKET, kv_stream
from services.ingress.accounts import seed_accounts
from tests.support.nats_delay_proxy import DelayingNatsProxy
from tests.support.relais import ACCOUNT, make_config

# Long enough for nats-py's consumer info (held a quarter as long) to come back first.
LATE = 0.8


@pytest.fixture
async def slow_records_url(nats_server: EmbeddedNats) -> AsyncIterator[str]:
    """A URL on which the account records' watch deliveries come late; the bucket exists."""
    bus = await start_bus(make_config(nats_url=nats_server.url), "test-topology", attempts=5)
    await bus.close()
    async with DelayingNatsProxy(nats_server.url, kv_stream(ACCOUNTS_BUCKET), LATE) as proxy:
        yield proxy.url


async def first_view(url: str) -> tuple[dict[str, AccountConfig], list[dict[str, AccountConfig]]]:
    """The view once `loaded`, and the view at each `on_change` call until then."""
    nc = await nats.connect(url)
    seen: list[dict[str, AccountConfig]] = []
    watch = AccountWatch(nc.jetstream(), {})
    watch.on_change(lambda: seen.append(dict(watch.accounts)))
    watch.start()
    try:
        async with asyncio.timeout(20):  # a guard against a hang, not a measure
            await watch.loaded.wait()
        return dict(watch.accounts), seen
    finally:
        await watch.stop()
        await nc.close()


async def test_records_stored_before_the_watch_are_in_its_first_view(
    nats_server: EmbeddedNats, slow_records_url: str
) -> None:
    config = make_config(nats_url=nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        await seed_accounts(await nc.jetstream().key_value(ACCOUNTS_BUCKET), config.accounts)
    finally:
        await nc.close()

    view, seen = await first_view(slow_records_url)
    assert list(view) == [ACCOUNT]
    assert view[ACCOUNT].domains == config.accounts[ACCOUNT].domains
    assert [list(v) for v in seen] == [[ACCOUNT]]  # never an empty view announced as complete


async def test_an_empty_bucket_and_one_whose_records_were_deleted_are_empty_views(
    nats_server: EmbeddedNats, slow_records_url: str
) -> None:
    view, seen = await first_view(slow_records_url)
    assert view == {} and seen == [{}]

    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(ACCOUNTS_BUCKET)
        await seed_accounts(kv, make_config(nats_url=nats_server.url).accounts)
        await kv.delete(ACCOUNT)  # the bucket keeps the delete marker (and the value in history)
    finally:
        await nc.close()
    view, seen = await first_view(slow_records_url)
    assert view == {} and seen == [{}]
