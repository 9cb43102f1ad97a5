"""`bare_line_endings = "normalise"`: a line begun by a bare LF or CR is dot-unstuffed like any other.

A client that ends lines with a bare LF still dot-stuffs the lines after it: "a\\n..b" is the line
".b". The reader used to undo dot-stuffing only after CRLFs, and the line endings were normalised
after it, so such a line kept its extra dot. A line that is a single "." next to a bare line
ending did not end the data (only <CRLF>.<CRLF> does) and stays a "." line (RFC 5321 4.5.2 takes
the period off longer lines only): the smuggling imitations arrive as visible body text.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.ingress.helpers import (
    SUBMISSION_TO_DATA,
    ehlo_auth,
    in_thread,
    queued,
    read_replies,
    to_data,
)
from tests.support.relais import RelaisStack

HEAD = b"From: <news@acme.test>\r\nSubject: dots\r\n\r\n"
END = b".\r\n"

CASES = [
    (b"a\n..b\r\n", b"a\r\n.b\r\n"),  # the dot-stuffed line after a bare LF
    (b"a\r..b\r\n", b"a\r\n.b\r\n"),  # after a bare CR
    (b"a\n...\r\n", b"a\r\n..\r\n"),  # a stuffed ".." line
    (b"a\n..b\n..c\r\n", b"a\r\n.b\r\n.c\r\n"),  # one line ended by a bare LF, the next too
    (b"a\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),  # a lone "." after a bare LF: not an end, kept
    (b"a\r\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),  # a lone "." before one: kept, not made a blank line
    (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),  # CRLF lines as ever
]


def _session(address: tuple[str, int], pieces: list[bytes], between: Callable[[], None]) -> bytes:
    """An authenticated raw session to DATA; `pieces` of the message sent one by one, `between`
    called after each but the last; the reply to the end of data."""
    with socket.create_connection(address, timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        to_data(sock, ehlo_auth() + SUBMISSION_TO_DATA)
        for piece in pieces[:-1]:
            sock.sendall(piece)
            between()
        sock.sendall(pieces[-1])
        return (read_replies(sock, 1) or [b""])[0]


async def _stored_body(stack: RelaisStack) -> bytes:
    [env] = await queued(stack.config.nats.url)
    # The header block gains Received:, Message-ID: and Date:; the body is as stored.
    return (env.body.inline or b"").split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(("sent", "stored"), CASES, ids=repr)
async def test_lines_after_bare_line_endings_are_unstuffed(
    make_ingress: Callable[..., Any], sent: bytes, stored: bytes
) -> None:
    stack = await make_ingress(ingress={"bare_line_endings": "normalise"})
    reply = await in_thread(_session, stack.smtp_address, [HEAD + sent + END], lambda: None)
    assert reply.startswith(b"250 "), reply
    assert await _stored_body(stack) == stored


SPLITS = [(b"a\n", b"..b\r\n"), (b"a\r", b"..b\r\n"), (b"a\n.", b".b\r\n")]


@pytest.mark.parametrize(("first", "second"), SPLITS, ids=repr)
async def test_a_read_that_ends_at_the_bare_line_ending(
    make_ingress: Callable[..., Any], first: bytes, second: bytes
) -> None:
    # The first piece is read (its octets counted in the DATA budget) before the second is sent:
    # the reader's block ends at the bare line ending (or inside the stuffed dots).
    stack = await make_ingress(ingress={"bare_line_endings": "normalise"})
    assert stack.ingress is not None
    budget = stack.ingress.budget
    head = HEAD + first
    # The reader keeps back the last four octets it read (they may begin the end-of-data line).
    seen = len(head) - 4

    def first_piece_read() -> None:
        # Polled from the client's thread while the ingress' event loop runs on.
        for _ in range(1000):
            if budget.used >= seen:
                return
            time.sleep(0.01)
        raise AssertionError(f"the first piece was not read: {budget.used} of {seen} octets")

    reply = await in_thread(_session, stack.smtp_address, [head, second + END], first_piece_read)
    assert reply.startswith(b"250 "), reply
    assert await _stored_body(stack) == b"a\r\n.b\r\n"
