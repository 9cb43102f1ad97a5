"""A webhook that an operator cleared (`relais account webhook --clear`) on an account whose
config-file table still names one keeps no consumer when a service starts again.

The file only seeds the account record; the record says the webhook is gone. Every service's
start (`ensure_topology`) used to make `webhooks-<account>` again from the file: nobody pulled
from it, and a webhook set again later got every event kept since that start, not those from
then on, as `--clear` promises (like deleting a webhook at Postmark or SendGrid)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.js.errors import NotFoundError

from services.core.bus import Bus
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ACCOUNTS_BUCKET, EVENTS_STREAM, ensure_topology, webhooks_binding
from services.ingress.accounts import seed_accounts
from tests.integration.bounce.conftest import webhook_account
from tests.support.relais import ACCOUNT, run_cli

HOOK = "http://127.0.0.1:9/hooks/relais"


async def has_consumer(bus: Bus, account: str) -> bool:
    try:
        await bus.js.consumer_info(EVENTS_STREAM, webhooks_binding(account).durable)
    except NotFoundError:
        return False
    return True


async def test_a_restart_does_not_make_the_consumer_of_a_cleared_webhook_again(
    topology_bus: Bus, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url), accounts=webhook_account(HOOK))
    await ensure_topology(topology_bus.js, config)  # no record yet: the file's webhook
    assert await has_consumer(topology_bus, ACCOUNT)
    await seed_accounts(await topology_bus.js.key_value(ACCOUNTS_BUCKET), config.accounts)
    await ensure_topology(topology_bus.js, config)  # the record has the file's webhook
    assert await has_consumer(topology_bus, ACCOUNT)

    cleared = await asyncio.to_thread(run_cli, config, tmp_path, "account", "webhook", ACCOUNT, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert not await has_consumer(topology_bus, ACCOUNT)

    await ensure_topology(topology_bus.js, config)  # a service starts again, same file
    assert not await has_consumer(topology_bus, ACCOUNT)
