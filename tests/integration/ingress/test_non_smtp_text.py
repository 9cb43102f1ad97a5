"""Security regression: text that is no SMTP command never has its later lines run as commands.

aiosmtpd reads every line outside DATA as a command: the lines it does not know are answered 500,
and a MAIL, RCPT and DATA further down are obeyed. Two ways text gets there:
- a message sent without waiting for 354 (RFC 2920 3.1 has the client wait) whose DATA was
  refused: the message, with recipients chosen by whoever wrote its text, would be queued;
- an HTTP request sent to the SMTP port (a web server's SSRF) with SMTP lines inside it.
As Postfix does, the first header line or HTTP method ends the session (221 2.7.0). A DATA that
is accepted still takes text sent early as the message (`test_bad_input`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.replies import NON_SMTP_COMMAND
from tests.integration.ingress.helpers import ehlo_auth, in_thread, listening, queued, queued_inbound
from tests.support.relais import ACCOUNT

SMUGGLED = (
    b"MAIL FROM:<news@acme.test>\r\n"
    b"RCPT TO:<victim@alpha.test>\r\n"
    b"DATA\r\n"
    b"From: <news@acme.test>\r\nSubject: smuggled\r\n\r\nspam\r\n.\r\n"
)
# A short header block: past aiosmtpd's five unknown commands a session ends anyway.
TEXT = b"From: <news@acme.test>\r\nSubject: hi\r\n\r\n" + SMUGGLED + b"bye\r\n.\r\n"


def _everything_at_once(address: tuple[str, int], script: bytes) -> list[bytes]:
    """`script` in one write; the last line of every reply until the server closes (or says
    nothing more for 5 s)."""
    data = b""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(script)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
    return [line for line in data.split(b"\r\n")[:-1] if line[3:4] == b" "]


@pytest.mark.parametrize("mode", ["submission", "inbound"])
async def test_a_message_after_a_refused_data_runs_no_command(
    make_ingress: Callable[..., Any], mode: str
) -> None:
    stack, [address] = await listening(make_ingress, {"local_domains": ["alpha.test"]}, {"mode": mode})
    # The only recipient is refused (its domain has an empty label), so DATA is refused too.
    opening = b"EHLO c.test\r\n" if mode == "inbound" else ehlo_auth()
    refused = b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha..test>\r\nDATA\r\n"
    script = opening + refused + TEXT + b"QUIT\r\n"
    replies = await in_thread(_everything_at_once, address, script)
    envs = await (queued_inbound if mode == "inbound" else queued)(stack.config.nats.url)
    assert [e.recipients for e in envs] == [], replies
    greeting = 2 if mode == "inbound" else 3  # 220, EHLO[, AUTH]
    mail, rcpt, data, *rest = replies[greeting:]
    assert mail.startswith(b"250") and rcpt[:1] == b"5" and data.startswith(b"503"), replies
    assert rest == [str(NON_SMTP_COMMAND).encode()], replies


async def test_an_http_request_runs_no_command(make_ingress: Callable[..., Any]) -> None:
    # A web server in relay_networks, made to fetch a URL on the SMTP port, sends no AUTH.
    stack = await make_ingress(ingress={"relay_networks": ["127.0.0.0/8"], "relay_networks_account": ACCOUNT})
    request = b"GET /?x= HTTP/1.1\r\nHELO web.test\r\n" + SMUGGLED + b"Host: relais.test\r\n\r\n"
    replies = await in_thread(_everything_at_once, stack.smtp_address, request)
    assert [e.recipients for e in await queued(stack.config.nats.url)] == [], replies
    assert len(replies) == 2 and replies[0].startswith(b"220"), replies
    assert replies[1] == str(NON_SMTP_COMMAND).encode(), replies
