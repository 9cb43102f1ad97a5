"""Every way a connection ends gives its place in the connection gate back
(STARTTLS and implicit TLS handshakes that fail, sessions that end in each way)."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import (
    SUBMISSION_TO_DATA,
    ehlo_auth,
    in_thread,
    listening,
    read_replies,
    settle,
    tls_sections,
    to_data,
)
from tests.support.certs import TestPKI


def _to_starttls(sock: socket.socket) -> None:
    """Greeting, EHLO, STARTTLS: the server now awaits a TLS handshake."""
    read_replies(sock, 1)
    sock.sendall(b"EHLO c.test\r\n")
    read_replies(sock, 1)
    sock.sendall(b"STARTTLS\r\n")
    assert read_replies(sock, 1)[0].startswith(b"220")


def _starttls_then_garbage(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        _to_starttls(sock)
        sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        sock.settimeout(5)
        try:
            return sock.recv(200)
        except (TimeoutError, ConnectionResetError):
            return b"<no close>"


def _starttls_then_close(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        _to_starttls(sock)


def _tls_wrong_ca(address: tuple[str, int]) -> None:
    ctx = ssl.create_default_context()  # does not trust the test CA: the client aborts
    with socket.create_connection(address, timeout=10) as raw:
        try:
            ctx.wrap_socket(raw, server_hostname="relais.test")
        except ssl.SSLError:
            pass


def _tls_garbage(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as raw:
        raw.sendall(b"EHLO plain.test\r\n")
        raw.settimeout(5)
        try:
            raw.recv(100)
        except (TimeoutError, ConnectionResetError):
            pass


def _tls_session_reset(address: tuple[str, int], pki: TestPKI) -> None:
    raw = socket.create_connection(address, timeout=10)
    tls = pki.client_context().wrap_socket(raw, server_hostname="relais.test")
    read_replies(tls, 1)
    tls.sendall(b"EHLO c.test\r\n")
    read_replies(tls, 1)
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tls.close()


async def test_a_failed_starttls_handshake_gives_its_place_back(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    stack = await make_ingress(ingress=tls_sections(pki, max_connections_per_ip=3))
    gate = stack.ingress.gate
    said = await in_thread(_starttls_then_garbage, stack.smtp_address)
    await in_thread(_starttls_then_close, stack.smtp_address)
    ok = await settle(lambda: gate.open_connections("127.0.0.1") == 0)
    assert ok, (said, gate.open_connections("127.0.0.1"), len(stack.ingress._connections))


async def test_implicit_tls_every_ending_gives_its_place_back(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    stack, [address] = await listening(
        make_ingress, tls_sections(pki, max_connections_per_ip=3), {"mode": "implicit-tls"}
    )
    gate = stack.ingress.gate
    await in_thread(_tls_wrong_ca, address)
    await in_thread(_tls_garbage, address)
    await in_thread(_tls_session_reset, address, pki)
    ok = await settle(lambda: gate.open_connections("127.0.0.1") == 0)
    assert ok, gate.open_connections("127.0.0.1")
    assert await settle(lambda: not stack.ingress._connections)


def _tls_data_then_unwrap(address: tuple[str, int], pki: TestPKI) -> None:
    raw = socket.create_connection(address, timeout=10)
    tls = pki.client_context().wrap_socket(raw, server_hostname="relais.test")
    to_data(tls, ehlo_auth() + SUBMISSION_TO_DATA)
    tls.sendall(b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n" + b"\r\n.")
    plain_sock = tls.unwrap()  # close_notify in the middle of the end-of-data line
    plain_sock.close()


async def test_implicit_tls_close_notify_mid_data(
    make_ingress: Callable[..., Any], pki: TestPKI, caplog: Any
) -> None:
    stack, [address] = await listening(make_ingress, tls_sections(pki), {"mode": "implicit-tls"})
    gate, budget = stack.ingress.gate, stack.ingress.budget
    try:
        await in_thread(_tls_data_then_unwrap, address, pki)
    except (OSError, ssl.SSLError):
        pass
    assert await settle(lambda: gate.open_connections("127.0.0.1") == 0 and budget.used == 0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.records


def _random_endings(
    tls_address: tuple[str, int], proxy_address: tuple[str, int], pki: TestPKI, seed: int
) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        kind = rng.choice(["tls", "proxy"])
        address = tls_address if kind == "tls" else proxy_address
        raw = socket.create_connection(address, timeout=5)
        try:
            step = rng.randint(0, 4)
            if kind == "tls":
                if step == 0:
                    pass
                elif step == 1:
                    raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # a truncated ClientHello
                else:
                    s = pki.client_context().wrap_socket(raw, server_hostname="relais.test")
                    raw = s
                    read_replies(s, 1)
                    if step >= 3:
                        s.sendall(b"EHLO c.test\r\nMAIL FROM:<x@acme.test>\r\n")
            else:
                if step >= 1:
                    raw.sendall(b"PROXY TCP4 203.0.113.%d 10.0.0.1 1 25\r\n" % rng.randint(1, 3))
                if step >= 2:
                    read_replies(raw, 1)
                    raw.sendall(b"EHLO c.test\r\n")
                if step >= 3:
                    raw.sendall(b"PROXY again\r\n")
            if rng.random() < 0.5:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        finally:
            raw.close()


async def test_random_endings_leave_no_count(make_ingress: Callable[..., Any], pki: TestPKI) -> None:
    stack, [tls_address, proxy_address] = await listening(
        make_ingress,
        tls_sections(pki, max_connections_per_ip=1000),
        {"mode": "implicit-tls"},
        {"proxy_protocol": True},
    )
    gate = stack.ingress.gate
    await asyncio.gather(
        *(in_thread(_random_endings, tls_address, proxy_address, pki, seed) for seed in range(4))
    )
    ok = await settle(lambda: not gate._open and not gate._waiting, 13)
    assert ok, (dict(gate._open), dict(gate._waiting), len(stack.ingress._connections))
