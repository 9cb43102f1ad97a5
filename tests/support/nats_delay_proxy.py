"""A loopback TCP proxy in front of a real nats-server that holds back a stream's push deliveries.

nats-server sends a consumer's messages and its JetStream API replies from different goroutines,
so on a busy machine a reply (consumer info, say) can reach the client before messages the
consumer had already sent. This proxy makes that order certain: every MSG/HMSG whose reply
subject is a JetStream ack of `stream` reaches the client `delay` seconds late (in their own
order), while everything else from the server passes at once. And so that the consumer has sent
them by then, a client's consumer-info request on `stream` (with what the client sends after
it, in order) reaches the server a quarter of `delay` late. Nothing is dropped or altered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.support.loopback_proxy import LoopbackProxy


class DelayingNatsProxy(LoopbackProxy):
    def __init__(self, upstream_url: str, stream: str, delay: float) -> None:
        super().__init__(upstream_url)
        self._ack_prefix = f"$JS.ACK.{stream}.".encode()
        self._info_prefix = f"$JS.API.CONSUMER.INFO.{stream}.".encode()
        self._delay = delay

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = await self._open_upstream(client_writer)
        if link is None:
            return
        server_reader, server_writer = link
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        requests: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._spawn(self._pump_from_client(client_reader, requests))
        self._spawn(_release_held(requests, server_writer))
        self._spawn(self._pump_from_server(server_reader, client_writer, held))
        self._spawn(_release_held(held, client_writer))

    async def _pump_from_client(
        self, reader: asyncio.StreamReader, requests: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        # One queue, so a held request holds back what follows it: the order stays the client's.
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                frame = await _read_frame(reader, (b"PUB", b"HPUB"))
                op, _, rest = frame.partition(b" ")
                late = op in (b"PUB", b"HPUB") and rest.startswith(self._info_prefix)
                requests.put_nowait((time.monotonic() + (self._delay / 4 if late else 0.0), frame))
        requests.put_nowait((0.0, _CLOSE))

    async def _pump_from_server(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        held: asyncio.Queue[tuple[float, bytes]],
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                frame = await _read_frame(reader, (b"MSG", b"HMSG"))
                tokens = frame.split(b"\r\n", 1)[0].split() or [b""]
                # MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <hdr size> <size>
                reply = tokens[3] if len(tokens) == {b"MSG": 5, b"HMSG": 6}.get(tokens[0]) else b""
                if reply.startswith(self._ack_prefix):
                    held.put_nowait((time.monotonic() + self._delay, frame))
                else:
                    writer.write(frame)
                    await writer.drain()
        held.put_nowait((0.0, _CLOSE))


_CLOSE = b""  # queued when a side hangs up: the other is closed once what was held before is out


async def _read_frame(reader: asyncio.StreamReader, with_payload: tuple[bytes, ...]) -> bytes:
    """One protocol line, with its payload for the operations that carry one (the last
    argument is the payload's size)."""
    frame = await reader.readuntil(b"\r\n")
    tokens = frame.split()
    if tokens and tokens[0] in with_payload:
        frame += await reader.readexactly(int(tokens[-1]) + 2)  # payload and its CRLF
    return frame


async def _release_held(held: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while True:
            due, frame = await held.get()
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            if frame == _CLOSE:
                break
            writer.write(frame)
            await writer.drain()
    writer.close()
