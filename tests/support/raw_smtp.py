"""Hand-scripted SMTP servers on loopback, for what an aiosmtpd sink cannot play: replies split
or merged across writes, sessions dropped between messages, a message read slowly, not at all,
or refused part-way. A subclass of `RawServer` writes `_serve`; one of `ScriptedMX` only its DATA
phase, `on_data`. The `serving` context starts servers on demand and stops every one it started."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar


class RawServer(ABC):
    """A TCP server on (`host`, `port`), by default 127.0.0.1 and a free port, whose
    connections go to `_serve`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Play one connection's side of the dialogue."""


class ScriptedMX(RawServer):
    """A plain server up to the message: greets, answers EHLO with `extensions` (and STARTTLS
    before TLS when it has a `context`), takes STARTTLS, answers QUIT with 221 and any other
    command with `reply_to` (250). DATA gets a 354, then `on_data` plays the transfer. A client resetting
    the connection (as one giving up a transfer does) ends the session quietly."""

    extensions: tuple[bytes, ...] = (b"8BITMIME",)

    def __init__(
        self, context: ssl.SSLContext | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        super().__init__(host, port)
        self.context = context

    @abstractmethod
    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        """Play the transfer after the 354: the reply to send next, or None to end the session."""

    def reply_to(self, verb: bytes) -> bytes | None:
        """The reply to any other command (HELO, MAIL, RCPT, RSET...); None closes without one."""
        return b"250 ok\r\n"

    def ehlo_reply(self, tls: bool) -> bytes:
        keywords = [b"mx", *([b"STARTTLS"] if self.context is not None and not tls else []), *self.extensions]
        return b"".join(b"250-%s\r\n" % k for k in keywords[:-1]) + b"250 %s\r\n" % keywords[-1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx ESMTP\r\n")
        tls = False
        try:
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
                if verb == b"STARTTLS" and self.context is not None and not tls:
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.context)
                    tls = True
                    continue
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    reply = await self.on_data(reader, writer)
                    if reply is None:
                        return
                    writer.write(reply)
                elif verb == b"EHLO":
                    writer.write(self.ehlo_reply(tls))
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    other = self.reply_to(verb)
                    if other is None:
                        return
                    writer.write(other)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class StopsReadingAfter354(ScriptedMX):
    """Reads nothing of the message for `pause` seconds, so that the client's writes back up;
    then counts in `received` what still comes until the client closes or resets."""

    def __init__(self, context: ssl.SSLContext | None = None, *, pause: float = 3.0) -> None:
        super().__init__(context)
        self.pause = pause
        self.received = 0

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        await asyncio.sleep(self.pause)
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 10.0):
                self.received += len(chunk)
        return None


class ReadsSlowly(ScriptedMX):
    """Takes the message in bites of `bite` octets, `pause` seconds apart (128 KiB every 50 ms:
    about 2.5 MB/s), counting them in `received`: a slow link that still makes progress. 250
    after the final dot."""

    bite = 128 * 1024
    pause = 0.05

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context)
        self.received = 0

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        tail = b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(self.bite)
            if not chunk:
                return None
            self.received += len(chunk)
            tail = (tail + chunk)[-5:]
            await asyncio.sleep(self.pause)
        return b"250 ok\r\n"


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
