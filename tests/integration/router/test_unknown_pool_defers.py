"""An account whose pool is no longer configured (renamed in the config file, while the account
record in KV still names the old one) falls back to "default". Where no "default" pool is
configured either, its jobs must not go to a subject no delivery worker reads, where they would
wait for ever without an outcome: they are deferred until the configuration is mended."""

from __future__ import annotations

import dataclasses

import nats

from services.core.config import PoolConfig
from services.core.topology import DELIVER_STREAM, route_subject
from services.ingress.accounts import put_account
from services.router.service import NO_POOL
from tests.integration.router.conftest import account
from tests.support.relais import ACCOUNT, an_envelope, wait_for_events


async def test_mail_of_an_account_whose_pool_is_gone_is_deferred_not_parked(make_stack) -> None:
    stack = await make_stack(services=("router",), pools={"shared": PoolConfig()}, accounts=account("shared"))
    nc = await nats.connect(stack.config.nats.url)
    try:
        js = nc.jetstream()
        # The record as `relais account add --pool renamed-away` wrote it, before the rename.
        await put_account(js, ACCOUNT, dataclasses.replace(account()[ACCOUNT], pool="renamed-away"))
        await js.publish(route_subject(), an_envelope("a@alpha.test").to_msgpack())

        (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
        assert deferred.reply is not None and deferred.reply["enhanced"] == NO_POOL.enhanced_status
        assert (await js.stream_info(DELIVER_STREAM)).state.messages == 0
    finally:
        await nc.close()
