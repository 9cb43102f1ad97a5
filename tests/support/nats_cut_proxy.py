"""A loopback TCP proxy in front of a real nats-server whose link can be cut and mended.

`cut()` drops every connection through it and refuses new ones, as a network partition between
one client and NATS would: the client reconnects in vain while the server, and every client
connected to it directly, go on. `mend()` lets connections through again. Bytes pass unaltered.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.loopback_proxy import LoopbackProxy


class CuttableNatsProxy(LoopbackProxy):
    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url)
        self._cut = False

    def cut(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def mend(self) -> None:
        self._cut = False

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._cut:
            client_writer.transport.abort()
            return
        link = await self._open_upstream(client_writer)
        if link is None:
            return
        server_reader, server_writer = link
        self._spawn(self._pump(client_reader, server_writer))
        self._spawn(self._pump(server_reader, client_writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # One side hung up (or was cut): so does the other.
        writer.transport.abort()
        self._writers.discard(writer)
