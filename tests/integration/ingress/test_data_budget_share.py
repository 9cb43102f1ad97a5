"""The inbound listener's share of the DATA budget: one largest message always fits it (with
ingress.max_message_size = 0 the largest is the whole budget; a share of half refused such a
message with a temporary 452 for ever), and mail of the relay-networks account is an
account's, not held to the anonymous share."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import (
    hold_inbound,
    in_thread,
    inbound_message,
    listening,
    read_replies,
    settle,
    submit,
)
from tests.support.relais import ACCOUNT

LOCAL = "bounces.relais.test"


def _send(address: tuple[str, int], octets: int, declare: bool) -> list[bytes]:
    with socket.create_connection(address, timeout=10) as sock:
        size = f" SIZE={octets}" if declare else ""
        sock.sendall(f"EHLO anyone.test\r\nMAIL FROM:<>{size}\r\nRCPT TO:<postmaster>\r\nDATA\r\n".encode())
        finals = read_replies(sock, 5)
        if not finals[-1].startswith(b"354"):
            return finals
        sock.sendall(inbound_message(octets) + b".\r\n")
        return finals + read_replies(sock, 1)


async def test_one_largest_message_fits_the_anonymous_share_without_max_message_size(
    make_ingress: Callable[..., Any],
) -> None:
    stack, [inbound] = await listening(
        make_ingress,
        {
            "max_message_size": 0,  # the largest message is the whole budget
            "max_buffered_bytes": 30_000,
            "local_domains": [LOCAL],
        },
        {"mode": "inbound"},
    )
    budget = stack.ingress.budget
    assert budget.used == 0
    with_size = await in_thread(_send, inbound, 20_000, True)
    without = await in_thread(_send, inbound, 20_000, False)
    # 20 000 octets are within the size limit (30 000), and the budget is empty.
    assert with_size[2].startswith(b"250") and without[-1].startswith(b"250"), (
        budget.anonymous_share,
        with_size,
        without,
    )


async def test_anonymous_inbound_clients_cannot_starve_the_relay_networks_account(
    make_ingress: Callable[..., Any],
) -> None:
    """The fix's own scenario (test_data_budget's), with the account's mail coming from
    relay_networks instead of AUTH: that session is "anonymous" too, so the same two port-25
    clients still get its mail 452 4.3.1. Documented in the README ("relay networks' too"),
    but it is account mail, the very thing the share was to protect."""
    stack, [submission, inbound] = await listening(
        make_ingress,
        {
            "max_message_size": 20_000,
            "max_buffered_bytes": 30_000,
            "local_domains": [LOCAL],
            "relay_networks": ["127.0.0.0/8"],
            "relay_networks_account": ACCOUNT,
            "auth_require_tls": False,
        },
        {"mode": "submission"},
        {"mode": "inbound"},
    )
    budget = stack.ingress.budget
    # Two anonymous clients holding 9 800 octets each: 19 600 of the 20 000 share, 10 400 of the
    # budget left to authenticated sessions.
    held = [await in_thread(hold_inbound, inbound, 9_800) for _ in range(2)]
    try:
        await settle(lambda: budget.anonymous >= 19_000)  # and goes on if not: the 250 is what counts
        await asyncio.sleep(0.3)
        small = b"From: <news@acme.test>\r\nSubject: s\r\n\r\n" + b"small body line\r\n" * 60
        data = await in_thread(submit, submission, small, authenticate=False)
        assert data[0] == 250, (data, budget.used, budget.anonymous, budget.anonymous_share, budget.free)
    finally:
        for sock in held:
            sock.close()
