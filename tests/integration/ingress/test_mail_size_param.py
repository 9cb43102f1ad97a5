"""MAIL FROM with SIZE= made of a Unicode digit that int() refuses ("²") is a syntax error: aiosmtpd
calls int() on anything str.isdigit() accepts whenever data_size_limit is set (always, since
max_message_size = 0 means the DATA budget), which answered 451 with a traceback."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import in_thread, plain
from tests.support.relais import ACCOUNT, PASSWORD


def _mail_with(address: tuple[str, int], size: str) -> bytes:
    """The reply to MAIL FROM with `SIZE=<size>` (after EHLO and AUTH)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode())
        data = b""
        while data.count(b"\r\n250 ") + data.count(b"\r\n235 ") < 2:
            data += sock.recv(4096)
        sock.sendall(f"MAIL FROM:<news@acme.test> SIZE={size}\r\n".encode())
        return sock.recv(4096).split(b"\r\n")[0]


async def test_size_with_a_superscript_digit(make_ingress: Callable[..., Any], caplog: Any) -> None:
    stack = await make_ingress(ingress={"max_message_size": 0})
    caplog.set_level(logging.ERROR)
    said = await in_thread(_mail_with, stack.smtp_address, "\u00b2")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert said.startswith(b"501 5.5.4") and not tracebacks, (said, tracebacks)
