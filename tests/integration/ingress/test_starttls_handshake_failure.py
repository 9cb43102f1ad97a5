"""A STARTTLS handshake that fails is the client's doing (a scanner, a client that does not trust
the certificate, plaintext sent after the 220), not a fault of ours: it is logged as such, not
as an ERROR with a traceback, which is kept for what operators must act on."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import in_thread, read_replies, settle, tls_sections
from tests.support.certs import TestPKI


def _starttls_then_plaintext(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"EHLO c.test\r\n")
        read_replies(sock, 2)
        sock.sendall(b"STARTTLS\r\n")
        assert read_replies(sock, 1)[0].startswith(b"220")
        sock.sendall(b"EHLO c.test\r\n" * 4)
        sock.settimeout(5)
        while sock.recv(200):
            pass


async def test_a_failed_starttls_handshake_is_no_error_of_ours(
    make_ingress: Callable[..., Any], pki: TestPKI, caplog: Any
) -> None:
    stack = await make_ingress(ingress=tls_sections(pki))
    with caplog.at_level(logging.INFO, logger="services.ingress"):
        await in_thread(_starttls_then_plaintext, stack.smtp_address)
        assert await settle(lambda: not stack.ingress._connections)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
