"""The connection gate counts a connection from its accept: no address can hold sockets beyond
its limit while a TLS handshake or a PROXY header is awaited (security regression). And each
listener of a replica holds at most `ingress.max_connections` connections from all addresses
together: beyond it a client is told 421 4.3.2 (an implicit-TLS one is closed without a word),
and the replica's other listeners keep their own share."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.core import metrics
from services.ingress import service
from services.ingress.replies import LISTENER_FULL, TOO_MANY_CONNECTIONS
from tests.integration.ingress.helpers import (
    closed_at_once,
    hold_silent,
    in_thread,
    listening,
    settle,
    tls_sections,
)
from tests.support.certs import TestPKI

PROXY_V1 = "PROXY TCP4 {} 10.0.0.1 40000 25\r\n"


def _greeting_over_tls(address: tuple[str, int], pki: TestPKI, source: str = "127.0.0.1") -> int:
    with smtplib.SMTP_SSL(
        *address, context=pki.client_context(), timeout=10, source_address=(source, 0)
    ) as smtp:
        return smtp.noop()[0]


@pytest.fixture
async def implicit_tls(make_ingress: Callable[..., Any], pki: TestPKI) -> tuple[Any, tuple[str, int]]:
    stack, [address] = await listening(
        make_ingress, tls_sections(pki, max_connections_per_ip=2), {"mode": "implicit-tls"}
    )
    return stack, address


async def test_one_ip_cannothold_silent_more_than_its_limit_during_tls_handshakes(
    implicit_tls: tuple[Any, tuple[str, int]], pki: TestPKI
) -> None:
    stack, address = implicit_tls
    gate = stack.ingress.gate
    held = [await in_thread(hold_silent, address) for _ in range(2)]
    try:
        # The third is closed without a handshake, and without a word a TLS client could read.
        assert await in_thread(closed_at_once, await in_thread(hold_silent, address)) == b""
        assert gate.open_connections("127.0.0.1") == 2
        # Another address is not affected.
        assert await in_thread(_greeting_over_tls, address, pki, "127.0.0.2") == 250
        # A socket closed during its handshake gives its place back.
        held.pop().close()
        assert await settle(lambda: gate.open_connections("127.0.0.1") == 1)
        assert await in_thread(_greeting_over_tls, address, pki) == 250
    finally:
        for sock in held:
            sock.close()
    assert await settle(lambda: gate.open_connections("127.0.0.1") == 0)


async def test_a_handshake_that_times_out_gives_its_place_back(
    make_ingress: Callable[..., Any], pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_TLS_HANDSHAKE_TIMEOUT", 0.5)
    stack, [address] = await listening(
        make_ingress, tls_sections(pki, max_connections_per_ip=1), {"mode": "implicit-tls"}
    )
    silent = await in_thread(hold_silent, address)
    assert await in_thread(closed_at_once, await in_thread(hold_silent, address)) == b""
    assert stack.ingress.gate.open_connections("127.0.0.1") == 1
    # The server gives up on the silent one after the handshake timeout, and frees its place.
    assert await in_thread(closed_at_once, silent) == b""
    assert await settle(lambda: stack.ingress.gate.open_connections("127.0.0.1") == 0)
    assert await in_thread(_greeting_over_tls, address, pki) == 250


def _proxied(address: tuple[str, int], client: str, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(address, timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(PROXY_V1.format(client).encode())
        return sock.recv(200)


async def test_sockets_awaiting_a_proxy_header_count_per_load_balancer(
    make_ingress: Callable[..., Any],
) -> None:
    stack, [address] = await listening(
        make_ingress,
        {"max_connections_per_ip": 1, "max_proxy_pending_per_peer": 2},
        {"proxy_protocol": True},
    )
    gate = stack.ingress.gate
    held = [await in_thread(hold_silent, address) for _ in range(2)]
    try:
        # A third socket from that load balancer without its header: refused, in words its
        # client can read (the load balancer relays them).
        refused = await in_thread(closed_at_once, await in_thread(hold_silent, address))
        assert refused == f"{TOO_MANY_CONNECTIONS}\r\n".encode()
        assert gate.waiting_connections("127.0.0.1") == 2
        # Another load balancer is not affected.
        assert (await in_thread(_proxied, address, "203.0.113.9", "127.0.0.2")).startswith(b"220")
        # Once their headers name the clients, the clients' IPs count, each against its own limit.
        for sock, client in zip(held, ("203.0.113.1", "203.0.113.2"), strict=True):
            sock.sendall(PROXY_V1.format(client).encode())
            assert (await in_thread(sock.recv, 200)).startswith(b"220")
        assert gate.waiting_connections("127.0.0.1") == 0
        assert gate.open_connections("203.0.113.1") == 1
        assert await in_thread(_proxied, address, "203.0.113.1") == f"{TOO_MANY_CONNECTIONS}\r\n".encode()
        assert (await in_thread(_proxied, address, "203.0.113.3")).startswith(b"220")
    finally:
        for sock in held:
            sock.close()
    assert await settle(lambda: gate.open_connections("203.0.113.1") == 0)


async def test_a_connection_from_outside_proxy_from_is_closed_before_its_header(
    make_ingress: Callable[..., Any],
) -> None:
    # Its header would not be believed: it is not kept waiting for one (PROXY timeout: 10 s).
    stack, [address] = await listening(
        make_ingress, {}, {"proxy_protocol": True, "proxy_from": ["127.0.0.2/32"]}
    )
    assert await in_thread(closed_at_once, await in_thread(hold_silent, address, "127.0.0.3")) == b""
    assert stack.ingress.gate.waiting_connections("127.0.0.3") == 0


def _connect_and_close(address: tuple[str, int]) -> None:
    socket.create_connection(address, timeout=5).close()  # FIN, no PROXY header


async def test_a_connection_closed_before_its_proxy_header_frees_its_pending_slot(
    make_ingress: Callable[..., Any],
) -> None:
    # A load balancer's TCP health checks connect and close. Each kept its pending place until
    # aiosmtpd's 10 s PROXY timeout, so enough of them refused the clients behind it.
    stack, [address] = await listening(
        make_ingress, {"max_proxy_pending_per_peer": 3}, {"proxy_protocol": True}
    )
    gate = stack.ingress.gate
    for _ in range(3):
        await in_thread(_connect_and_close, address)
    assert await settle(lambda: gate.waiting_connections("127.0.0.1") == 0, 1.0)
    greeting = await in_thread(_proxied, address, "203.0.113.1")
    assert greeting[:3] == b"220", greeting


def _open_on(stack: Any, address: tuple[str, int]) -> float | None:
    """The listener's `relais_ingress_connections` gauge, as Prometheus would scrape it."""
    listen = next(listen for listen, bound in stack.ingress.addresses.items() if bound == address)
    return metrics.REGISTRY.get_sample_value("relais_ingress_connections", {"listener": listen})


def _greeting(address: tuple[str, int], source: str) -> bytes:
    sock = hold_silent(address, source)
    with sock:
        return sock.recv(200)


async def test_a_full_listener_refuses_any_address_and_leaves_the_others_theirs(
    make_ingress: Callable[..., Any],
) -> None:
    stack, [full, other] = await listening(
        make_ingress, {"max_connections": 2, "max_connections_per_ip": 1}, {}, {}
    )
    held = [await in_thread(hold_silent, full, source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        assert await settle(lambda: _open_on(stack, full) == 2)
        # A third address, under its own per-IP limit: the listener is full.
        refused = await in_thread(closed_at_once, await in_thread(hold_silent, full, "127.0.0.4"))
        assert refused == f"{LISTENER_FULL}\r\n".encode()
        # The other listener of the same replica is not affected.
        assert (await in_thread(_greeting, other, "127.0.0.4")).startswith(b"220")
        # A client refused by its own per-IP limit took no seat, and gave nothing back.
        refused = await in_thread(closed_at_once, await in_thread(hold_silent, full, "127.0.0.2"))
        assert refused == f"{TOO_MANY_CONNECTIONS}\r\n".encode()
        assert _open_on(stack, full) == 2
        # A connection that ends frees its seat.
        held.pop().close()
        assert await settle(lambda: _open_on(stack, full) == 1)
        assert (await in_thread(_greeting, full, "127.0.0.4")).startswith(b"220")
    finally:
        for sock in held:
            sock.close()
    assert await settle(lambda: _open_on(stack, full) == 0)


async def test_a_full_implicit_tls_listener_closes_without_a_word(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    # Sockets still in their TLS handshake hold their seats: that is the window being closed.
    stack, [address] = await listening(
        make_ingress, tls_sections(pki, max_connections=2), {"mode": "implicit-tls"}
    )
    held = [await in_thread(hold_silent, address, source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        assert await settle(lambda: _open_on(stack, address) == 2)
        assert await in_thread(closed_at_once, await in_thread(hold_silent, address, "127.0.0.4")) == b""
    finally:
        for sock in held:
            sock.close()
    assert await settle(lambda: _open_on(stack, address) == 0)


async def test_sockets_awaiting_their_proxy_header_hold_seats(make_ingress: Callable[..., Any]) -> None:
    stack, [address] = await listening(make_ingress, {"max_connections": 2}, {"proxy_protocol": True})
    held = [await in_thread(hold_silent, address, source) for source in ("127.0.0.2", "127.0.0.3")]
    try:
        # The load balancer relays the refusal to its client: in words.
        refused = await in_thread(closed_at_once, await in_thread(hold_silent, address, "127.0.0.4"))
        assert refused == f"{LISTENER_FULL}\r\n".encode()
    finally:
        for sock in held:
            sock.close()
    assert await settle(lambda: _open_on(stack, address) == 0)
