"""A starting bounce replica posts each webhook as the account records in KV say, not as its
config file said before an operator re-pointed or cleared it: its first pass waits for the
records. Bounded: with the records unreadable it posts from the file, as it always did.

Real nats-server and HTTP receiver; the records reach the replica late through a proxy (as on a
loaded machine), so that a replica posting before it has read them does so for certain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from services.bounce.webhooks import WebhookDispatcher
from services.core.bus import Bus
from services.core.config import Config
from services.core.embedded import EmbeddedNats
from services.core.events import Event, publish_event
from services.core.runtime import start_bus
from services.core.topology import ACCOUNTS_BUCKET, kv_stream
from services.ingress.accounts import put_account, seed_accounts
from tests.integration.bounce.conftest import Receiver, wait_accepted, webhook_account
from tests.support.nats_delay_proxy import DelayingNatsProxy
from tests.support.relais import ACCOUNT, make_config

# How late the account records reach the starting replica: well inside the replica's wait for
# them, and far longer than it takes to fetch and post an event.
RECORDS_LATE = 1.0
# Far beyond the replica's wait for them.
RECORDS_OUT_OF_REACH = 15.0


async def file_config_with_an_event(nats_url: str, receiver: Receiver, record_url: str | None) -> Config:
    """The config file names `?from=file` as the account's webhook; the record in KV (seeded from
    it, then changed by the operator) names `record_url` ("" cleared; None: no record change).
    One event of the account waits in its webhooks consumer, as events published while no bounce
    replica ran do."""
    config = make_config(nats_url=nats_url, accounts=webhook_account(f"{receiver.url}?from=file"))
    bus = await start_bus(config, "test-operator", attempts=5)  # the consumer made for the file's webhook
    try:
        await seed_accounts(await bus.js.key_value(ACCOUNTS_BUCKET), config.accounts)
        if record_url is not None:
            changed = dataclasses.replace(config.accounts[ACCOUNT], webhook_url=record_url)
            await put_account(bus.js, ACCOUNT, changed)
        await publish_event(bus, Event("accepted", "m-1", ACCOUNT, ["a@alpha.test"]), record=False)
    finally:
        await bus.close()
    return config


@contextlib.asynccontextmanager
async def dispatching(config: Config, records_late: float) -> AsyncIterator[WebhookDispatcher]:
    """A bounce replica's webhook dispatcher, started with the account records `records_late`."""
    async with DelayingNatsProxy(config.nats.url, kv_stream(ACCOUNTS_BUCKET), records_late) as proxy:
        config = dataclasses.replace(config, nats=dataclasses.replace(config.nats, url=proxy.url))
        bus: Bus = await start_bus(config, "test-bounce", attempts=5)
        dispatcher, stop = WebhookDispatcher(config, bus), asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop))
        try:
            yield dispatcher
        finally:
            stop.set()
            await running
            await bus.close()


async def records_applied(dispatcher: WebhookDispatcher, accounts: list[str]) -> None:
    deadline = time.monotonic() + 20
    while dispatcher.webhook_accounts() != accounts:
        assert time.monotonic() < deadline, "the account records never reached the replica"
        await asyncio.sleep(0.05)


async def test_a_webhook_re_pointed_in_kv_gets_its_events_at_the_new_url_only(
    nats_server: EmbeddedNats, receiver: Receiver
) -> None:
    config = await file_config_with_an_event(nats_server.url, receiver, f"{receiver.url}?from=record")
    async with dispatching(config, RECORDS_LATE):
        await wait_accepted(receiver, 1)
    with receiver.lock:
        assert receiver.paths == ["/hooks/relais?from=record"], "posted to the URL the operator replaced"


async def test_a_webhook_cleared_in_kv_gets_no_post(nats_server: EmbeddedNats, receiver: Receiver) -> None:
    config = await file_config_with_an_event(nats_server.url, receiver, "")
    async with dispatching(config, RECORDS_LATE) as dispatcher:
        await records_applied(dispatcher, [])
    with receiver.lock:
        assert receiver.requests == 0, f"posted to a webhook the operator removed: {receiver.paths}"


async def test_with_the_records_out_of_reach_the_file_s_webhooks_are_posted(
    nats_server: EmbeddedNats, receiver: Receiver
) -> None:
    # Records that do not come (KV away, or this slow) hold the replica back only so long; then
    # it posts from the config file, as it did before it waited for them.
    config = await file_config_with_an_event(nats_server.url, receiver, f"{receiver.url}?from=record")
    async with dispatching(config, RECORDS_OUT_OF_REACH):
        await wait_accepted(receiver, 1)
    with receiver.lock:
        assert receiver.paths == ["/hooks/relais?from=file"]
