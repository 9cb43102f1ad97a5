"""Every way a connection ends gives its place in the connection gate back
(STARTTLS and implicit TLS handshakes that fail, sessions that end in each way)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from services.core.config import ListenerConfig
from tests.integration.ingress.helpers import free_listen, in_thread, listener, tls_sections
from tests.support.certs import TestPKI


async def _settle(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def _recv_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _starttls_then_garbage(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        _recv_until(sock, b"\r\n")
        sock.sendall(b"EHLO c.test\r\n")
        _recv_until(sock, b"250 ")
        sock.sendall(b"STARTTLS\r\n")
        assert _recv_until(sock, b"\r\n").startswith(b"220")
        sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        sock.settimeout(5)
        try:
            return sock.recv(200)
        except (TimeoutError, ConnectionResetError):
            return b"<no close>"


def _starttls_then_close(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        _recv_until(sock, b"\r\n")
        sock.sendall(b"EHLO c.test\r\n")
        _recv_until(sock, b"250 ")
        sock.sendall(b"STARTTLS\r\n")
        assert _recv_until(sock, b"\r\n").startswith(b"220")


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
    _recv_until(tls, b"\r\n")
    tls.sendall(b"EHLO c.test\r\n")
    _recv_until(tls, b"250 ")
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tls.close()


async def test_a_failed_starttls_handshake_gives_its_place_back(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    stack = await make_ingress(ingress=tls_sections(pki, max_connections_per_ip=3))
    gate = stack.ingress.gate
    said = await in_thread(_starttls_then_garbage, stack.smtp_address)
    await in_thread(_starttls_then_close, stack.smtp_address)
    ok = await _settle(lambda: gate.open_connections("127.0.0.1") == 0)
    assert ok, (said, gate.open_connections("127.0.0.1"), len(stack.ingress._connections))


async def test_implicit_tls_every_ending_gives_its_place_back(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    listen = free_listen()
    stack = await make_ingress(
        ingress=tls_sections(
            pki, max_connections_per_ip=3, listeners=[ListenerConfig(listen=listen, mode="implicit-tls")]
        )
    )
    gate, address = stack.ingress.gate, listener(stack, listen)
    await in_thread(_tls_wrong_ca, address)
    await in_thread(_tls_garbage, address)
    await in_thread(_tls_session_reset, address, pki)
    ok = await _settle(lambda: gate.open_connections("127.0.0.1") == 0)
    assert ok, gate.open_connections("127.0.0.1")
    assert await _settle(lambda: not stack.ingress._connections)


def _tls_data_then_unwrap(address: tuple[str, int], pki: TestPKI) -> None:
    from tests.integration.ingress.helpers import plain
    from tests.support.relais import ACCOUNT, PASSWORD

    raw = socket.create_connection(address, timeout=10)
    tls = pki.client_context().wrap_socket(raw, server_hostname="relais.test")
    _recv_until(tls, b"\r\n")
    tls.sendall(
        f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
        + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    )
    _recv_until(tls, b"354 ")
    tls.sendall(b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n" + b"\r\n.")
    plain_sock = tls.unwrap()  # close_notify in the middle of the end-of-data line
    plain_sock.close()


async def test_implicit_tls_close_notify_mid_data(
    make_ingress: Callable[..., Any], pki: TestPKI, caplog: Any
) -> None:
    listen = free_listen()
    stack = await make_ingress(
        ingress=tls_sections(pki, listeners=[ListenerConfig(listen=listen, mode="implicit-tls")])
    )
    gate, budget, address = stack.ingress.gate, stack.ingress.budget, listener(stack, listen)
    try:
        await in_thread(_tls_data_then_unwrap, address, pki)
    except (OSError, ssl.SSLError):
        pass
    assert await _settle(lambda: gate.open_connections("127.0.0.1") == 0 and budget.used == 0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.records


def _random_endings(
    tls_address: tuple[str, int], proxy_address: tuple[str, int], pki: TestPKI, seed: int
) -> None:
    import random

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
                    _recv_until(s, b"\r\n")
                    if step >= 3:
                        s.sendall(b"EHLO c.test\r\nMAIL FROM:<x@acme.test>\r\n")
            else:
                if step >= 1:
                    raw.sendall(b"PROXY TCP4 203.0.113.%d 10.0.0.1 1 25\r\n" % rng.randint(1, 3))
                if step >= 2:
                    _recv_until(raw, b"\r\n")
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
    tls_listen, proxy_listen = free_listen(), free_listen()
    stack = await make_ingress(
        ingress=tls_sections(
            pki,
            max_connections_per_ip=1000,
            listeners=[
                ListenerConfig(listen=tls_listen, mode="implicit-tls"),
                ListenerConfig(listen=proxy_listen, proxy_protocol=True),
            ],
        )
    )
    gate = stack.ingress.gate
    await asyncio.gather(
        *(
            in_thread(_random_endings, listener(stack, tls_listen), listener(stack, proxy_listen), pki, seed)
            for seed in range(4)
        )
    )
    ok = await _settle(lambda: not gate._open and not gate._waiting, 13)
    assert ok, (dict(gate._open), dict(gate._waiting), len(stack.ingress._connections))
