"""A SIZE parameter that is not ASCII digits is a 501 syntax error however it is written: last of
several, or glued to the closing '>'. aiosmtpd takes the last SIZE and calls int() on anything
str.isdigit() accepts ("²"), which answered 451 with a traceback."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.ingress.helpers import in_thread, plain
from tests.support.relais import ACCOUNT, PASSWORD


def _mail_line(address: tuple[str, int], line: str) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode())
        data = b""
        while data.count(b"\r\n250 ") + data.count(b"\r\n235 ") < 2:
            data += sock.recv(4096)
        sock.sendall(line.encode() + b"\r\n")
        return sock.recv(4096).split(b"\r\n")[0]


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM:<news@acme.test> SIZE=10 SIZE=\u00b2",
        "MAIL FROM:<news@acme.test>SIZE=\u00b2",
    ],
    ids=["second-size", "glued-to-path"],
)
async def test_non_ascii_size_still_reaches_int(
    make_ingress: Callable[..., Any], caplog: Any, line: str
) -> None:
    stack = await make_ingress(ingress={"max_message_size": 0})
    caplog.set_level(logging.ERROR)
    said = await in_thread(_mail_line, stack.smtp_address, line)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert said.startswith(b"501") and not tracebacks, (said, [r.getMessage() for r in tracebacks])
