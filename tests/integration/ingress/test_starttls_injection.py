"""Security regression: plaintext sent in the same write as STARTTLS (CVE-2011-0411) is discarded,
never run inside the TLS session, whether or not a PROXY header came first (RFC 3207 4.2)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.replies import AUTH_REQUIRED
from tests.integration.ingress.helpers import in_thread, listening, plain, queued, read_replies, tls_sections
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD

# What a man in the middle adds behind the client's STARTTLS: a login as the account and the
# start of a transaction, which the client's own commands inside TLS would then complete.
INJECTED = f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode() + (
    b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<victim@alpha.test>\r\n"
)


def _inject(address: tuple[str, int], pki: TestPKI, preamble: bytes) -> list[bytes]:
    sock = socket.create_connection(address, timeout=15)
    sock.sendall(preamble + b"EHLO c.test\r\nSTARTTLS\r\n" + INJECTED)
    got = read_replies(sock, 3)  # greeting, EHLO, 220 ready: nothing answers the injected lines
    with pki.client_context().wrap_socket(sock, server_hostname="relais.test") as tls:
        tls.sendall(b"EHLO c.test\r\nMAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\n")
        tls.sendall(b"DATA\r\nQUIT\r\n")
        got += read_replies(tls, 5)
    return got


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "proxy-protocol"])
async def test_plaintext_sent_with_starttls_is_discarded(
    make_ingress: Callable[..., Any], pki: TestPKI, proxied: bool
) -> None:
    stack, [address] = await listening(make_ingress, tls_sections(pki), {"proxy_protocol": proxied})
    preamble = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n" if proxied else b""
    got = await in_thread(_inject, address, pki, preamble)
    assert [r[:3] for r in got[:3]] == [b"220", b"250", b"220"], got
    # Inside TLS: not logged in (MAIL refused), no transaction begun (RCPT and DATA refused).
    assert got[3].startswith(b"250") and got[4] == str(AUTH_REQUIRED).encode(), got
    assert [r[:3] for r in got[5:]] == [b"503", b"503", b"221"], got
    assert await queued(stack.config.nats.url) == []
