"""Hand-scripted SMTP servers on loopback, for what an aiosmtpd sink cannot play: replies split
or merged across writes, sessions dropped between messages. A subclass writes `_serve`; the
`serving` context starts servers on demand and stops every one it started."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar


class RawServer(ABC):
    """A TCP server on 127.0.0.1 (a free port) whose connections go to `_serve`."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Play one connection's side of the dialogue."""


S = TypeVar("S", bound=RawServer)


@contextlib.asynccontextmanager
async def serving(kind: Callable[..., S]) -> AsyncIterator[Callable[..., Awaitable[S]]]:
    """Yields `start(*args, **kwargs)`: a started `kind(*args, **kwargs)`; all stopped on exit."""
    servers: list[S] = []

    async def start(*args: Any, **kwargs: Any) -> S:
        server = kind(*args, **kwargs)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()
