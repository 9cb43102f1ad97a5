"""Security regression: SMTP smuggling (bare LF/CR end-of-data variants) never yields a second message.

Each attempt hides a complete second transaction behind a non-standard end-of-data sequence. Over
the whole stack (ingress -> router -> delivery -> MX sink), exactly one message must arrive: with
`reject` (the default) that is the honest message sent afterwards; with `normalise` it is the
attempt itself, carrying the would-be second transaction as harmless body text.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.replies import BARE_LINE_ENDING
from tests.integration.ingress.helpers import in_thread, plain
from tests.support.relais import ACCOUNT, PASSWORD, asubmit, message, read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink

# The end-of-data imitations: the three, and their mirror images.
VARIANTS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"]
SMUGGLED = (
    b"MAIL FROM:<ceo@acme.test>\r\n"
    b"RCPT TO:<victim@alpha.test>\r\n"
    b"DATA\r\n"
    b"From: CEO <ceo@acme.test>\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)


def _attempt(address: tuple[str, int], end_imitation: bytes) -> list[bytes]:
    """One raw SMTP session with a smuggling payload; returns every reply line."""
    first = b"From: <news@acme.test>\r\nSubject: first\r\n\r\nhello"
    script = [
        b"EHLO client.test\r\n",
        f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode(),
        b"MAIL FROM:<news@acme.test>\r\n",
        b"RCPT TO:<bob@alpha.test>\r\n",
        b"DATA\r\n",
        first + end_imitation + SMUGGLED + b"\r\n.\r\n",
        b"QUIT\r\n",
    ]
    with socket.create_connection(address, timeout=15) as sock:
        replies = [_read_reply(sock)]
        for chunk in script:
            sock.sendall(chunk)
            replies.append(_read_reply(sock))
        return replies


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        data += sock.recv(4096)
        lines = data.split(b"\r\n")
        # Complete when the last full line is "NNN text" (not "NNN-continued").
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


@pytest.mark.parametrize("end_imitation", VARIANTS, ids=repr)
async def test_smuggling_rejected(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], end_imitation: bytes
) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack()
    replies = await in_thread(_attempt, stack.smtp_address, end_imitation)
    data_reply = replies[-2]
    assert data_reply == f"{BARE_LINE_ENDING}\r\n".encode()
    # An honest message afterwards: it must be the only one that ever arrives.
    code, _ = await asubmit(stack.smtp_address, recipients=["carol@alpha.test"], data=message("honest"))
    assert code == 250
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    await asyncio.sleep(1.0)  # room for anything that should not exist to show up
    assert len(sink.messages) == 1
    assert sink.messages[0].rcpt_tos == ["carol@alpha.test"]
    assert b"smuggled" not in sink.messages[0].data
    accepted = [e for e in await read_events(stack.config.nats.url) if e.kind == "accepted"]
    assert len(accepted) == 1


@pytest.mark.parametrize("end_imitation", VARIANTS[:3], ids=repr)
async def test_smuggling_normalised_stays_one_message(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], end_imitation: bytes
) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(ingress={"bare_line_endings": "normalise"})
    replies = await in_thread(_attempt, stack.smtp_address, end_imitation)
    assert replies[-2].startswith(b"250 ")
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    await asyncio.sleep(1.0)
    assert len(sink.messages) == 1
    [got] = sink.messages
    assert got.rcpt_tos == ["bob@alpha.test"]
    # The would-be second transaction arrived as body text of the first message, dot line included.
    assert b"\r\n.\r\nMAIL FROM:<ceo@acme.test>\r\n" in got.data
