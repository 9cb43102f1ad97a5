"""Connections leave from the pool's source IPs; an address this host lacks is skipped, not stuck."""

from __future__ import annotations

import asyncio

from services.core.config import AccountConfig, PoolConfig, SourceConfig
from services.core.metrics import exposition
from services.core.runtime import start_bus
from services.delivery.service import DeliveryService
from tests.integration.delivery.conftest import SOURCE_A, SOURCE_B, UNBINDABLE, pools, submit_many
from tests.support.relais import ACCOUNT, asubmit, message, password_hash, wait_for_events


async def test_sink_sees_the_source_address_and_its_ehlo_name(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(pools=pools(SOURCE_B))
    await submit_many(stack, 2)
    got = await sink.async_wait_for(2)
    assert {m.peer[0] for m in got} == {SOURCE_B}
    assert {m.helo for m in got} == {"out-22.relais.test"}
    events = await wait_for_events(stack.config.nats.url, "delivered", 2)
    assert {e.source_ip for e in events} == {SOURCE_B}


async def test_unbindable_source_is_marked_unhealthy_and_mail_leaves_from_the_other(
    make_stack, make_sink
) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(pools=pools(UNBINDABLE, SOURCE_A))
    await submit_many(stack, 4)
    got = await sink.async_wait_for(4)
    assert {m.peer[0] for m in got} == {SOURCE_A}, "never from (or stuck on) the address this host lacks"

    bus = await start_bus(stack.config, "test-probe", attempts=3)
    try:
        worker = DeliveryService(stack.config, bus)
        assert worker.serving() == ["default"]
        assert UNBINDABLE in worker.health.unhealthy
        assert worker.health.unhealthy_total[UNBINDABLE] == 1
        scraped = exposition().decode()
        assert f'relais_source_unhealthy{{source_ip="{UNBINDABLE}"}} 1.0' in scraped
    finally:
        await bus.nc.close()


async def test_a_pool_none_of_whose_sources_bind_here_is_not_served(make_stack) -> None:
    stack = await make_stack(services=(), pools=pools(UNBINDABLE))
    bus = await start_bus(stack.config, "test-probe", attempts=3)
    try:
        worker = DeliveryService(stack.config, bus)
        assert worker.serving() == [], "another host that has the address serves this pool"
    finally:
        await bus.nc.close()
    await asyncio.sleep(0)


async def test_an_ip_in_two_pools_greets_with_each_pool_s_name(make_stack, make_sink) -> None:
    # One IP, two EHLO names: a connection opened for one pool is not reused for the other.
    sink = make_sink("127.0.0.2")
    two_names = {
        "default": PoolConfig(sources=[SourceConfig(address=SOURCE_A, ehlo="out.acme.test")]),
        "brand": PoolConfig(sources=[SourceConfig(address=SOURCE_A, ehlo="out.brand.test")]),
    }
    account = AccountConfig(password_hash=password_hash(), domains=["acme.test", "brand.test"])
    stack = await make_stack(
        pools=two_names, accounts={ACCOUNT: account}, sender_domains={"brand.test": "brand"}
    )
    for n, sender in enumerate(("news@acme.test", "news@brand.test"), start=1):
        data = message(sender=sender)
        assert (await asubmit(stack.smtp_address, sender=sender, recipients=["r@alpha.test"], data=data))[
            0
        ] == 250
        await sink.async_wait_for(n)
    assert [m.helo for m in sink.messages] == ["out.acme.test", "out.brand.test"]
