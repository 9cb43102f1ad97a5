"""The router follows the live account records in NATS KV (changed with `relais account`), so
an account moved to another pool sends from that pool's IPs without a router restart."""

from __future__ import annotations

import dataclasses

import nats

from services.core.config import PoolConfig, SourceConfig
from services.ingress.accounts import get_account, put_account
from tests.integration.router.conftest import account, asubmit_many
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, message


async def test_a_pool_changed_in_kv_is_used_for_routing(make_stack, make_sink) -> None:
    pools = {
        "default": PoolConfig(),
        "shared": PoolConfig(sources=[SourceConfig(address="127.0.0.11")]),
        "moved": PoolConfig(sources=[SourceConfig(address="127.0.0.12")]),
    }
    stack = await make_stack(pools=pools, accounts=account("shared"))
    nc = await nats.connect(stack.config.nats.url)
    try:
        js = nc.jetstream()
        current = await get_account(js, ACCOUNT)
        assert current is not None and current.pool == "shared", "seeded from the config file"
        await put_account(js, ACCOUNT, dataclasses.replace(current, pool="moved"))
    finally:
        await nc.close()
    sink = make_sink("127.0.0.2")
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["k@alpha.test"], message())])
    (got,) = await sink.async_wait_for(1)
    assert got.peer[0] == "127.0.0.12"
