"""A message that keeps arriving is not cut off by the command timeout, however long it takes
in all: a large message over a slow link would otherwise get 421 at the same point on every
retry and never be taken. As Postfix's smtpd_min_data_rate: each octet received buys time, up
to a whole command timeout, so a client that stalls for that long is still cut off."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from services.ingress.replies import TIMEOUT
from tests.integration.ingress.helpers import (
    SUBMISSION_TO_DATA,
    ehlo_auth,
    in_thread,
    queued,
    read_replies,
    to_data,
)
from tests.support.relais import message

TIMEOUT_SECONDS = 2.0


def _trickle(address: tuple[str, int], pieces: list[bytes], pause: float) -> list[bytes]:
    """Send a message in `pieces`, `pause` seconds apart, then its end: the replies after 354."""
    with socket.create_connection(address, timeout=15) as sock:
        to_data(sock, ehlo_auth() + SUBMISSION_TO_DATA)
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)
            sock.sendall(b".\r\n")
            return read_replies(sock, 1)
        except (BrokenPipeError, ConnectionResetError):
            return [b"(closed by the server)"]


async def test_a_message_that_keeps_arriving_outlasts_the_command_timeout(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress(ingress={"command_timeout": TIMEOUT_SECONDS})
    body = message(body="x" * 70 + "\r\n") + (b"y" * 78 + b"\r\n") * 500  # about 40 KB
    pieces = [body[i : i + 4000] for i in range(0, len(body), 4000)]
    # Eleven pieces 0.3 s apart: the transfer takes longer than the timeout, no pause nearly as long.
    replies = await in_thread(_trickle, ingress.smtp_address, pieces, 0.3)
    assert replies and replies[0].startswith(b"250 2.0.0 Ok: queued"), replies
    assert len(await queued(ingress.config.nats.url)) == 1


def _stall(address: tuple[str, int], content: bytes) -> list[bytes]:
    """Send part of a message and nothing more: what the server says before it closes."""
    with socket.create_connection(address, timeout=15) as sock:
        to_data(sock, ehlo_auth() + SUBMISSION_TO_DATA)
        sock.sendall(content)
        return read_replies(sock, 1)


async def test_a_message_that_stalls_for_the_command_timeout_is_cut_off(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress(ingress={"command_timeout": TIMEOUT_SECONDS})
    # Plenty of octets (they buy time, but never more than one timeout), then a stall.
    replies = await in_thread(_stall, ingress.smtp_address, message() + (b"y" * 78 + b"\r\n") * 500)
    assert replies == [str(TIMEOUT).encode()], replies
    assert await queued(ingress.config.nats.url) == []
