"""A client that half-closes (shutdown(SHUT_WR), `nc -N`) once it has sent everything still reads
the replies: every command it sent is answered, as Postfix does, and its message is queued with
a 250 it hears. Before, the end of its input cancelled the session at once: pipelined commands
went unanswered, and a message whose final dot had been read could be queued without the 250 (a
retry would deliver it twice). A message cut short by the half-close is still not queued."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import SUBMISSION_TO_DATA, ehlo_auth, in_thread, queued
from tests.support.relais import message


def _half_closed(address: tuple[str, int], script: bytes) -> list[bytes]:
    """Send `script`, shut the write side, and read until the server closes: the last line of
    every reply."""
    with socket.create_connection(address, timeout=15) as sock:
        sock.sendall(script)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [line for line in data.split(b"\r\n")[:-1] if line[3:4] == b" "]


def _stuffed(body: bytes) -> bytes:
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def test_a_pipelined_session_ending_in_a_half_close_is_answered_in_full(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    script = ehlo_auth() + SUBMISSION_TO_DATA + _stuffed(message()) + b"QUIT\r\n"
    replies = await in_thread(_half_closed, ingress.smtp_address, script)
    codes = [r[:3] for r in replies]
    assert codes == [b"220", b"250", b"235", b"250", b"250", b"354", b"250", b"221"], replies
    assert replies[6].startswith(b"250 2.0.0 Ok: queued"), replies
    assert len(await queued(ingress.config.nats.url)) == 1


async def test_the_final_dot_then_a_half_close_still_hears_its_250(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    script = ehlo_auth() + SUBMISSION_TO_DATA + _stuffed(message())
    replies = await in_thread(_half_closed, ingress.smtp_address, script)
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued"), replies
    [env] = await queued(ingress.config.nats.url)
    assert replies[-1].endswith(env.id.encode()), replies


async def test_a_message_cut_short_by_a_half_close_is_not_queued(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    cut = message()[:-20]  # a few lines of it, without the final dot
    script = ehlo_auth() + SUBMISSION_TO_DATA + cut
    replies = await in_thread(_half_closed, ingress.smtp_address, script)
    assert replies[-1].startswith(b"354"), replies
    assert await queued(ingress.config.nats.url) == []
