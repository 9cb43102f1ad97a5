"""The inbound listener's share of the DATA budget: one largest message always fits it (with
ingress.max_message_size = 0 the largest is the whole budget; a share of half refused such a
message with a temporary 452 for ever), and mail of the relay-networks account is an
account's, not held to the anonymous share."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from services.core.config import ListenerConfig
from tests.integration.ingress.helpers import free_listen, in_thread, listener

LOCAL = "bounces.relais.test"


def _finals(sock: socket.socket, count: int, data: bytes = b"") -> tuple[list[bytes], bytes]:
    while len(finals := [x for x in data.split(b"\r\n")[:-1] if x[3:4] == b" "]) < count:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return finals, data


def _send(address: tuple[str, int], octets: int, declare: bool) -> list[bytes]:
    with socket.create_connection(address, timeout=10) as sock:
        size = f" SIZE={octets}" if declare else ""
        sock.sendall(f"EHLO anyone.test\r\nMAIL FROM:<>{size}\r\nRCPT TO:<postmaster>\r\nDATA\r\n".encode())
        finals, data = _finals(sock, 5)
        if not finals[-1].startswith(b"354"):
            return finals
        sock.sendall(b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (octets // 80) + b".\r\n")
        finals, _ = _finals(sock, 6, data)
        return finals


async def test_one_largest_message_fits_the_anonymous_share_without_max_message_size(
    make_ingress: Callable[..., Any],
) -> None:
    inbound = free_listen()
    stack = await make_ingress(
        ingress={
            "max_message_size": 0,  # the largest message is the whole budget
            "max_buffered_bytes": 30_000,
            "local_domains": [LOCAL],
            "listeners": [ListenerConfig(listen=inbound, mode="inbound")],
        }
    )
    budget = stack.ingress.budget
    assert budget.used == 0
    with_size = await in_thread(_send, listener(stack, inbound), 20_000, True)
    without = await in_thread(_send, listener(stack, inbound), 20_000, False)
    # 20 000 octets are within the size limit (30 000), and the budget is empty.
    assert with_size[2].startswith(b"250") and without[-1].startswith(b"250"), (
        budget.anonymous_share,
        with_size,
        without,
    )


def _hold_inbound(address: tuple[str, int], octets: int) -> socket.socket:
    """An anonymous port-25 client that sends most of a message to postmaster and stalls."""
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"EHLO anyone.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    finals, _ = _finals(sock, 5)
    assert finals[-1].startswith(b"354"), finals
    sock.sendall(b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * (octets // 80))
    return sock


async def test_anonymous_inbound_clients_cannot_starve_the_relay_networks_account(
    make_ingress: Callable[..., Any],
) -> None:
    """The fix's own scenario (test_data_budget's), with the account's mail coming from
    relay_networks instead of AUTH: that session is "anonymous" too, so the same two port-25
    clients still get its mail 452 4.3.1. Documented in the README ("relay networks' too"),
    but it is account mail, the very thing the share was to protect."""
    import asyncio

    from tests.integration.ingress.helpers import client
    from tests.support.relais import ACCOUNT

    submission, inbound = free_listen(), free_listen()
    stack = await make_ingress(
        ingress={
            "max_message_size": 20_000,
            "max_buffered_bytes": 30_000,
            "local_domains": [LOCAL],
            "relay_networks": ["127.0.0.0/8"],
            "relay_networks_account": ACCOUNT,
            "auth_require_tls": False,
            "listeners": [
                ListenerConfig(listen=submission, mode="submission"),
                ListenerConfig(listen=inbound, mode="inbound"),
            ],
        }
    )
    budget = stack.ingress.budget
    # Two anonymous clients holding 9 800 octets each: 19 600 of the 20 000 share, 10 400 of the
    # budget left to authenticated sessions.
    held = [await in_thread(_hold_inbound, listener(stack, inbound), 9_800) for _ in range(2)]
    try:
        for _ in range(100):
            if budget.anonymous >= 19_000:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)

        def submit() -> tuple[int, bytes]:
            with client(listener(stack, submission)) as smtp:
                smtp.mail("news@acme.test")
                smtp.rcpt("a@alpha.test")
                return smtp.data(
                    b"From: <news@acme.test>\r\nSubject: s\r\n\r\n" + b"small body line\r\n" * 60
                )

        data = await in_thread(submit)
        assert data[0] == 250, (data, budget.used, budget.anonymous, budget.anonymous_share, budget.free)
    finally:
        for sock in held:
            sock.close()
