"""How many octets of stored message bodies one router, delivery or bounce process holds at
once (`router.max_buffered_bytes`, `delivery.max_buffered_bytes`, `bounce.max_buffered_bytes`).

Each fetches a large body from the Object Store whole: the router to DKIM-sign it (the signer
holds about three more copies), delivery to send it (with its DKIM prefix and the dot-stuffed
output), bounce to parse an inbound report or return an original whole in a DSN. At 64 jobs at
a time and up to 50 MiB a body, a few large messages at once exceed a pod's memory limit; the
process is killed, the jobs come back after `ack_wait` and kill the next replica the same way.
So a job waits here for room before it fetches; the memory a process needs is then bounded by
its budget, whatever the mix of messages.

Bodies carried inline in the envelope (up to `nats.inline_body_max`, 128 KiB) are already in
memory with the message and are not counted. Waiters are served in arrival order, so a large
body is not starved by a stream of smaller ones; a body larger than the whole budget waits
until nothing else is held and then is held alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from services.core.envelope import BodyRef


class HeldBodies:
    """A first-come, first-served budget of octets; `capacity` 0 means no budget."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def holding(self, octets: int) -> AsyncIterator[None]:
        """Hold `octets` of the budget for the block, after waiting for room."""
        if not self.capacity:
            yield
            return
        need = min(octets, self.capacity)
        await self._acquire(need)
        try:
            yield
        finally:
            self._release(need)

    def holding_body(self, ref: BodyRef) -> AbstractAsyncContextManager[None]:
        """`holding` a stored body's octets; nothing for a body carried inline."""
        return contextlib.nullcontext() if ref.is_inline else self.holding(ref.size)

    async def _acquire(self, need: int) -> None:
        if not self._waiting and self.used + need <= self.capacity:
            self.used += need
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((need, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(need)  # granted just as it was cancelled: give it back
            else:
                with contextlib.suppress(ValueError):  # `_grant` may have dropped it already
                    self._waiting.remove((need, granted))
                self._grant()  # it may have been the head that held the others back
            raise

    def _release(self, need: int) -> None:
        self.used -= need
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            need, granted = self._waiting[0]
            if granted.done():  # its waiter was cancelled and has not run yet
                self._waiting.popleft()
                continue
            if self.used + need > self.capacity:
                return
            self._waiting.popleft()
            self.used += need
            granted.set_result(None)
