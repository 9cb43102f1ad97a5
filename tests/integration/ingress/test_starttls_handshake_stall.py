"""A client that says STARTTLS and then never finishes the handshake is cut off by the idle
timeout, and its session ends with it: the connection slot, the listener seat and the session's
place among the replica's connections are given back (security regression: a client could hold
slots forever, one per try, whenever command_timeout is below asyncio's 60 s handshake timeout).
Likewise when the replica stops: such a session must not hold the stop up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import in_thread, read_replies, settle, tls_sections
from tests.support.certs import TestPKI


def _to_handshake(address: tuple[str, int]) -> socket.socket:
    """A client the server told 220 to STARTTLS, which then sends no ClientHello."""
    sock = socket.create_connection(address, timeout=10)
    read_replies(sock, 1)
    sock.sendall(b"EHLO c.test\r\n")
    read_replies(sock, 1)
    sock.sendall(b"STARTTLS\r\n")
    assert read_replies(sock, 1)[0].startswith(b"220")
    return sock


def _starttls_then_silent(address: tuple[str, int]) -> bytes:
    """What the server sends after its 220 to STARTTLS, until it closes."""
    with _to_handshake(address) as sock:
        data = b""
        while chunk := sock.recv(200):
            data += chunk
        return data


def _greeting(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        return read_replies(sock, 1)[0]


async def test_a_stalled_starttls_handshake_ends_its_session(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    stack = await make_ingress(ingress=tls_sections(pki, max_connections_per_ip=1, command_timeout=1))
    gate = stack.ingress.gate
    await in_thread(_starttls_then_silent, stack.smtp_address)  # returns once the server closed
    assert await settle(lambda: gate.open_connections("127.0.0.1") == 0), gate.open_connections("127.0.0.1")
    assert await settle(lambda: not stack.ingress._connections)
    # The one slot this IP has is free again.
    assert (await in_thread(_greeting, stack.smtp_address)).startswith(b"220 ")


async def test_a_session_in_its_starttls_handshake_does_not_hold_up_a_stop(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    stack = await make_ingress(ingress=tls_sections(pki))  # the default command_timeout
    sock = await in_thread(_to_handshake, stack.smtp_address)
    try:
        await asyncio.wait_for(stack.ingress.stop(), 5)
    finally:
        sock.close()
