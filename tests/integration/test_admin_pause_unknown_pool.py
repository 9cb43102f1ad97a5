"""`relais pause pool <name>` against a real nats-server, for a pool the cluster does not have (a
typo during an incident). Delivery workers look a pool's pause up by the job's pool, so a pause
under another name holds nothing; yet the command said "paused pool ..." and exited 0, and
`relais status` listed the pause. Every pool has its delivery consumer (`delivery-<pool>`), so the
command knows the cluster's pools with only `--nats-url`: an unknown one is refused as a usage
error naming them, and nothing is stored. Resuming one stays allowed, to clear a stored pause."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from services.cli import main
from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig, PoolConfig
from services.core.embedded import EmbeddedNats
from services.core.pause import PauseState, pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET, ensure_topology


@pytest.fixture
async def two_pools(nats_server: EmbeddedNats) -> AsyncIterator[Bus]:
    """A cluster whose topology has the pools `default` and `bulk`."""
    config = Config(
        nats=NatsConfig(url=nats_server.url), pools={"default": PoolConfig(), "bulk": PoolConfig()}
    )
    bus = await connect(config.nats, "test-pools")
    try:
        await ensure_topology(bus.js, config)
        yield bus
    finally:
        await bus.close()


async def test_pausing_a_pool_the_cluster_does_not_have_is_a_usage_error_naming_its_pools(
    two_pools: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await _cli(["pause", "pool", "defualt", "--reason", "incident 7", "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 2, captured.out
    assert captured.out == "", "nothing says it was paused"
    (line,) = captured.err.splitlines()
    assert line.startswith("relais: ") and "defualt" in line, line
    assert "bulk, default" in line, "the pools that exist, to pick the right one"
    assert await PauseState(two_pools.js).paused() == [], "a refused pause stores nothing"


async def test_a_pool_of_the_cluster_is_paused_in_any_case(
    two_pools: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await _cli(["pause", "pool", "Bulk", "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out == "paused pool bulk\n"
    listed = await PauseState(two_pools.js).paused()
    assert [(p.kind, p.name) for p in listed] == [("pool", "bulk")]


async def test_a_stored_pause_of_a_pool_that_is_gone_can_be_resumed(
    two_pools: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stored before pools were checked, or for a pool removed since with its consumer.
    kv = await two_pools.js.key_value(DELIVERY_CONTROL_BUCKET)
    record = {"kind": "pool", "name": "defualt", "reason": "typo", "at": 1.0, "by": "ann"}
    await kv.put(pause_key("pool", "defualt"), json.dumps(record).encode())
    rc = await _cli(["resume", "pool", "defualt", "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "resumed pool defualt" in captured.out
    assert await PauseState(two_pools.js).paused() == []


async def _cli(argv: list[str]) -> int:
    # The CLI runs its own event loop (asyncio.run): off this test's loop, in a thread.
    return await asyncio.to_thread(main, argv)
