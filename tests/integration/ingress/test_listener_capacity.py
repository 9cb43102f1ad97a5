"""Each listener of a replica holds at most `ingress.max_connections` connections, from any
addresses together, counted from their accept like the per-IP limit: many addresses cannot
exhaust the process either. Beyond it a client is told 421 4.3.2 (an implicit-TLS one is closed
without a word), and the replica's other listeners keep their own share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.core import metrics
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
