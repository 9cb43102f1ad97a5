"""The budget of stored bodies a router or delivery process holds at once."""

from __future__ import annotations

import asyncio

from services.core.envelope import BodyRef
from services.core.held_bodies import HeldBodies


async def _holder(budget: HeldBodies, octets: int, order: list[str], name: str, go: asyncio.Event) -> None:
    async with budget.holding(octets):
        order.append(name)
        await go.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_body_waits_until_there_is_room() -> None:
    budget, order, go = HeldBodies(100), [], asyncio.Event()
    first = asyncio.create_task(_holder(budget, 70, order, "first", go))
    await _settle()
    second = asyncio.create_task(_holder(budget, 50, order, "second", asyncio.Event()))
    await _settle()
    assert order == ["first"] and budget.used == 70
    go.set()
    await first
    await _settle()
    assert order == ["first", "second"] and budget.used == 50
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert budget.used == 0


async def test_waiters_are_served_in_order_so_large_bodies_are_not_starved() -> None:
    budget, order = HeldBodies(100), []
    go = {name: asyncio.Event() for name in ("a", "large", "small")}
    a = asyncio.create_task(_holder(budget, 60, order, "a", go["a"]))
    await _settle()
    large = asyncio.create_task(_holder(budget, 90, order, "large", go["large"]))
    await _settle()
    small = asyncio.create_task(_holder(budget, 10, order, "small", go["small"]))
    await _settle()
    assert order == ["a"], "the small body would fit, but the large one came first"
    go["a"].set()
    await _settle()
    assert order == ["a", "large", "small"]
    for event in go.values():
        event.set()
    await asyncio.gather(a, large, small)
    assert budget.used == 0


async def test_a_body_larger_than_the_budget_is_held_alone() -> None:
    budget, order, go = HeldBodies(100), [], asyncio.Event()
    huge = asyncio.create_task(_holder(budget, 500, order, "huge", go))
    await _settle()
    assert order == ["huge"] and budget.used == 100
    go.set()
    await huge
    assert budget.used == 0


async def test_a_waiter_cancelled_gives_its_turn_to_the_next() -> None:
    budget, order, go = HeldBodies(100), [], asyncio.Event()
    first = asyncio.create_task(_holder(budget, 80, order, "first", go))
    await _settle()
    cancelled = asyncio.create_task(_holder(budget, 90, order, "cancelled", asyncio.Event()))
    after = asyncio.create_task(_holder(budget, 10, order, "after", go))
    await _settle()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    await _settle()
    assert order == ["first", "after"], "the cancelled head no longer holds the next back"
    go.set()
    await asyncio.gather(first, after)
    assert budget.used == 0


async def test_inline_bodies_and_no_budget_never_wait() -> None:
    budget = HeldBodies(10)
    async with budget.holding(10):
        async with budget.holding_body(BodyRef(size=5_000, inline=b"x" * 5_000)):
            assert budget.used == 10
    unlimited = HeldBodies(0)
    async with unlimited.holding(10**9), unlimited.holding(10**9):
        assert unlimited.used == 0
