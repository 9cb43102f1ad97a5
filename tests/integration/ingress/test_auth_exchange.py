"""The AUTH exchange itself: over-long response lines, authorization identities, empty initial
responses (RFC 4954, RFC 4616)."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from services.ingress.replies import AUTH_AUTHZID, AUTH_LINE_TOO_LONG, AUTH_MALFORMED, AUTH_OK
from tests.integration.ingress.helpers import client, in_thread, plain, reply
from tests.support.relais import ACCOUNT, PASSWORD


@pytest.fixture
async def ingress(make_ingress: Callable[..., Any]) -> Any:
    return await make_ingress()


def _replies(sock: socket.socket, count: int) -> list[bytes]:
    """The last lines of the next `count` replies."""
    data = b""
    while len(last := _last_lines(data)) < count and (chunk := sock.recv(4096)):
        data += chunk
    return last


def _last_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n")[:-1] if line[3:4] == b" "]


def _over_long_response(address: tuple[str, int]) -> list[bytes]:
    sock = socket.create_connection(address, timeout=10)
    with sock:
        sock.sendall(b"EHLO c.test\r\nAUTH PLAIN\r\n")
        replies = _replies(sock, 3)
        # 3000 octets after the 334, in two segments, the second looking like a command.
        sock.sendall(b"A" * 1500)
        time.sleep(0.2)
        sock.sendall(b"A" * 1490 + b" NOOP\r\n")
        time.sleep(0.2)
        sock.sendall(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\nQUIT\r\n".encode())
        return replies + _replies(sock, 3)


async def test_an_over_long_auth_response_cancels_the_exchange(ingress: Any) -> None:
    replies = await in_thread(_over_long_response, ingress.smtp_address)
    assert replies[2] == b"334 " and replies[3:5] == [str(AUTH_LINE_TOO_LONG).encode(), str(AUTH_OK).encode()]
    assert replies[5].startswith(b"221"), replies


async def test_an_authzid_other_than_the_authcid_is_refused(ingress: Any) -> None:
    def scenario() -> list[tuple[int, bytes]]:
        as_other = base64.b64encode(f"postmaster\0{ACCOUNT}\0{PASSWORD}".encode()).decode()
        as_self = base64.b64encode(f"{ACCOUNT}\0{ACCOUNT}\0{PASSWORD}".encode()).decode()
        with client(ingress.smtp_address) as smtp:
            refused = smtp.docmd("AUTH", f"PLAIN {as_other}")
            return [refused, smtp.docmd("AUTH", f"PLAIN {as_self}")]

    refused, accepted = await in_thread(scenario)
    assert refused == reply(AUTH_AUTHZID) and accepted == reply(AUTH_OK)


async def test_an_empty_initial_response_is_an_empty_response(ingress: Any) -> None:
    # RFC 4954 4: "=" is an initial response of zero octets, not bad base64. Empty, PLAIN has no
    # fields to split; LOGIN asks for the password next.
    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            answers = [smtp.docmd("AUTH", "PLAIN ="), smtp.docmd("AUTH", "LOGIN =")]
            return [*answers, smtp.docmd("*")]

    plain_empty, login_empty, aborted = await in_thread(scenario)
    assert plain_empty == reply(AUTH_MALFORMED)
    password_challenge = base64.b64encode(SMTP.AuthLoginPasswordChallenge.encode())
    assert login_empty == (334, password_challenge) and aborted[0] == 501
