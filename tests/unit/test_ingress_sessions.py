"""Open sessions per account: the local count at once, KV written in the background."""

from __future__ import annotations

import asyncio

from services.ingress.limits import SessionRegistry


async def test_session_counts_are_written_in_the_background_latest_value_last() -> None:
    class FakeKV:
        def __init__(self) -> None:
            self.puts: list[tuple[str, bytes]] = []
            self.gate = asyncio.Event()

        async def put(self, key: str, value: bytes) -> None:
            await self.gate.wait()
            self.puts.append((key, value))

    kv = FakeKV()
    registry = SessionRegistry(js=None, replica="me")  # type: ignore[arg-type]
    registry._kv = kv  # type: ignore[assignment]
    writer = asyncio.create_task(registry._writer())
    registry._tasks = [writer]
    try:
        # AUTH does not wait for KV: the count is local at once.
        assert await asyncio.wait_for(registry.acquire("acme", limit=2), 1)
        assert registry.open_sessions("acme") == 1
        await asyncio.sleep(0)
        assert await registry.acquire("acme", limit=2)
        assert not await registry.acquire("acme", limit=2)
        registry.release("acme")
        kv.gate.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if kv.puts and kv.puts[-1] == ("acme.me", b"1") and not registry._dirty:
                break
        # The writer coalesced the burst; whatever it wrote, the last write is the count now.
        assert kv.puts[-1] == ("acme.me", b"1") and len(kv.puts) <= 2
    finally:
        registry._kv = None
        await registry.stop()
    assert writer.done()
