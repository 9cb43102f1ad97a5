"""Connections leave from the pool's source IPs; an address this host lacks is skipped, not stuck."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from services.core.config import AccountConfig, PoolConfig, SourceConfig, WarmupConfig
from services.core.metrics import exposition
from services.core.runtime import start_bus
from services.delivery import service as delivery_service
from services.delivery import sources
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


async def test_a_job_pinned_to_another_hosts_source_is_sent_by_that_host(make_stack, make_sink) -> None:
    # One IP per node, as in Kubernetes: worker X has only the warm IP, worker Y only the warming
    # one, and both pull the pool's jobs. Warm-up pins each job to the source whose cap counted
    # it; whichever worker gets a job of the other's IP must hand it back, not send it itself.
    warming, warm = "127.0.0.13", "127.0.0.14"
    cap = 3
    today = time.strftime("%Y-%m-%d", time.gmtime())
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        services=("ingress", "router", "bounce"),
        pools={
            "default": PoolConfig(),
            "warming": PoolConfig(
                sources=[
                    SourceConfig(address=warming, weight=5, warmup="new-ip", warmup_start=today),
                    SourceConfig(address=warm, weight=1),
                ]
            ),
        },
        warmup={"new-ip": WarmupConfig(daily=[cap, 10 * cap], overflow="warm")},
        accounts={
            ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["acme.test"], pool="warming")
        },
    )
    stop = asyncio.Event()
    buses = [await start_bus(stack.config, f"test-delivery-{i}", attempts=3) for i in range(2)]
    workers = [DeliveryService(stack.config, bus) for bus in buses]
    workers[0].health.mark_unhealthy(warming, "lives on another host in this test")
    workers[1].health.mark_unhealthy(warm, "lives on another host in this test")
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        await submit_many(stack, 12)
        got = await sink.async_wait_for(12, timeout=60)
        assert Counter(m.peer[0] for m in got) == {warming: cap, warm: 12 - cap}
        assert [w.pin_missed for w in workers] == [0, 0]
        assert all(w.attempts > 0 for w in workers), [w.attempts for w in workers]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for bus in buses:
            await bus.nc.close()


async def test_a_pool_is_served_once_an_address_of_it_binds_here(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None of the pool's addresses is on this host at start; then one fails over to it.
    sink = make_sink("127.0.0.2")
    stack = await make_stack(services=("ingress", "router", "bounce"), pools=pools(SOURCE_A))
    here = {"bound": False}
    monkeypatch.setattr(sources, "can_bind", lambda address: here["bound"])
    monkeypatch.setattr(sources, "RECHECK_SECONDS", 0.2)
    monkeypatch.setattr(delivery_service, "RECHECK_SECONDS", 0.2)
    bus = await start_bus(stack.config, "test-delivery-late", attempts=3)
    worker = DeliveryService(stack.config, bus)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await submit_many(stack, 1)
        await asyncio.sleep(1.0)
        assert sink.messages == [] and worker.attempts == 0, "nothing to send from yet"
        here["bound"] = True
        (got,) = await sink.async_wait_for(1, timeout=30)
        assert got.peer[0] == SOURCE_A
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await bus.nc.close()
