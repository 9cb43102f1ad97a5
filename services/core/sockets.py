"""Outgoing TCP connections made by hand, where a library would hide what is needed: delivery's
source address and its connect timeout apart from the greeting's, webhooks' address tried one
by one after a lookup that cannot hang the event loop."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


def numeric_peers(address: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo's entries for an IP address: answered at once, without the thread a name's
    lookup needs (the event loop's getaddrinfo runs in one for any host)."""
    return socket.getaddrinfo(address, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)


async def connect(family: int, kind: int, proto: int, peer: Any, *, source: str = "") -> socket.socket:
    """A non-blocking socket connected to `peer`, bound to `source` first when given; closed on
    any failure, a cancellation included."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if source:
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, peer)
    except BaseException:
        sock.close()
        raise
    return sock
