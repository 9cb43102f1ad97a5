"""A loopback TCP proxy in front of a real nats-server whose link can be cut and mended.

`cut()` drops every connection through it and refuses new ones, as a network partition between
one client and NATS would: the client reconnects in vain while the server, and every client
connected to it directly, go on. `mend()` lets connections through again. Bytes pass unaltered.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class CuttableNatsProxy:
    def __init__(self, upstream_url: str) -> None:
        host, _, port = upstream_url.removeprefix("nats://").rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"nats://{host}:{port}"

    def cut(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def mend(self) -> None:
        self._cut = False

    async def __aenter__(self) -> CuttableNatsProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._cut:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # One side hung up (or was cut): so does the other.
        writer.transport.abort()
        self._writers.discard(writer)
