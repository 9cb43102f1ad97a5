"""The AUTH exchange itself: line lengths (RFC 4954's 12,288 octets), over-long response lines,
authorization identities, empty initial responses (RFC 4954, RFC 4616)."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.auth import LOGIN_PASSWORD_CHALLENGE
from services.ingress.replies import (
    AUTH_AUTHZID,
    AUTH_LINE_TOO_LONG,
    AUTH_MALFORMED,
    AUTH_OK,
    AUTH_REQUIRED,
)
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
        # 14,000 octets after the 334, in two segments, the second looking like a command.
        sock.sendall(b"A" * 7000)
        time.sleep(0.2)
        sock.sendall(b"A" * 6990 + b" NOOP\r\n")
        time.sleep(0.2)
        sock.sendall(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\nQUIT\r\n".encode())
        return replies + _replies(sock, 3)


async def test_an_over_long_auth_response_cancels_the_exchange(ingress: Any) -> None:
    replies = await in_thread(_over_long_response, ingress.smtp_address)
    assert replies[2] == b"334 " and replies[3:5] == [str(AUTH_LINE_TOO_LONG).encode(), str(AUTH_OK).encode()]
    assert replies[5].startswith(b"221"), replies


def _base64_of_length(n: int) -> bytes:
    """Valid base64, `n` octets long (a multiple of 4), of a blob PLAIN cannot split."""
    return base64.b64encode(b"x" * (n // 4 * 3))


def _padded(line: bytes, length: int) -> bytes:
    return line + b" " * (length - len(line))


def _line_lengths(address: tuple[str, int]) -> list[bytes]:
    """The reply to each line of the longest lengths allowed, and one octet more."""
    mail = b"MAIL FROM:<news@acme.test> SIZE=1"
    lines = [
        # AUTH with its initial response: 12,288 octets in all (trailing blanks are not part of
        # the argument), then one more.
        _padded(b"AUTH PLAIN " + _base64_of_length(12272), 12288),
        _padded(b"AUTH PLAIN " + _base64_of_length(12272), 12289),
        # A response in the exchange: 12,288 octets, then one more (after a second AUTH).
        b"AUTH PLAIN",
        _base64_of_length(12288),
        b"AUTH PLAIN",
        b"A" * 12289,
        # Every other command keeps its limit: 512, MAIL 1148, RCPT 1012; and over the reader's.
        b"NOOP " + b"x" * 507,
        b"NOOP " + b"x" * 508,
        b"NOOP " + b"x" * 5000,
        b"NOOP " + b"x" * 20000,
        _padded(mail, 1148),
        _padded(mail, 1149),
        _padded(b"RCPT TO:<a@alpha.test>", 1013),
        b"NOOP",
    ]
    sock = socket.create_connection(address, timeout=10)
    with sock:
        sock.sendall(b"EHLO c.test\r\n")
        _replies(sock, 2)
        answers = []
        for line in lines:
            sock.sendall(line + b"\r\n")
            answers.append(_replies(sock, 1)[0])
        return answers


async def test_auth_lines_reach_rfc_4954_s_length_and_other_commands_keep_theirs(
    make_ingress: Callable[..., Any],
) -> None:
    # RFC 4954 4: 12,288 octets for deployed mechanisms (Kerberos tickets, long OAuth tokens).
    ingress = await make_ingress(ingress={"max_errors": 100})
    answers = await in_thread(_line_lengths, ingress.smtp_address)
    malformed, too_long = str(AUTH_MALFORMED).encode(), b"500 5.5.2 Command line too long"
    assert answers[:6] == [malformed, too_long, b"334 ", malformed, b"334 ", str(AUTH_LINE_TOO_LONG).encode()]
    assert answers[6:] == [
        b"250 2.0.0 OK",
        too_long,
        too_long,
        too_long,
        str(AUTH_REQUIRED).encode(),  # within MAIL's limit: the command itself is answered
        too_long,
        too_long,
        b"250 2.0.0 OK",
    ]


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
    password_challenge = base64.b64encode(LOGIN_PASSWORD_CHALLENGE.encode())
    assert login_empty == (334, password_challenge) and aborted[0] == 501
