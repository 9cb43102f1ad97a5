"""Commands pipelined after the end-of-data line are processed exactly once and in
order, wherever the socket splits the stream; a 2,000-octet DATA line is still refused."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.ingress.replies import LINE_TOO_LONG
from tests.integration.ingress.helpers import (
    ehlo_auth,
    in_thread,
    listening,
    queued,
    queued_inbound,
    read_replies,
    tls_sections,
)
from tests.support.relais import message


def _transaction(subject: str, rcpt: str = "a@alpha.test") -> bytes:
    return (
        b"MAIL FROM:<news@acme.test>\r\n"
        + f"RCPT TO:<{rcpt}>\r\n".encode()
        + b"DATA\r\n"
        + message(subject=subject).replace(b"\r\n.", b"\r\n..")
        + b".\r\n"
    )


def _pipelined(address: tuple[str, int], pieces: list[bytes], replies: int) -> list[bytes]:
    with socket.create_connection(address, timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(ehlo_auth())
        read_replies(sock, 3)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.03)  # each piece its own read on the server
        return read_replies(sock, replies)


@pytest.mark.parametrize("cut", range(-6, 8))
async def test_pipelined_transactions_after_the_end_line_split_anywhere(
    make_ingress: Callable[..., Any], cut: int
) -> None:
    stack = await make_ingress()
    first, second = _transaction("one"), _transaction("two", "b@alpha.test")
    stream = first + second + b"QUIT\r\n"
    at = len(first) - 3 + cut  # around the first message's end line and the MAIL after it
    replies = await in_thread(_pipelined, stack.smtp_address, [stream[:at], stream[at:]], 7)
    codes = [r[:3] for r in replies]
    assert codes[:7] == [b"250", b"250", b"354", b"250", b"250", b"250", b"354"], replies
    envs = await queued(stack.config.nats.url)
    subjects = [b"Subject: one" in (e.body.inline or b"") for e in envs]
    assert len(envs) == 2 and subjects == [True, False], [e.recipients for e in envs]
    assert [list(e.recipients) for e in envs] == [["a@alpha.test"], ["b@alpha.test"]]


async def test_a_2000_octet_data_line_is_still_refused(make_ingress: Callable[..., Any]) -> None:
    stack = await make_ingress()
    body = message(subject="long", body="x" * 2000 + "\r\n")
    stream = b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n" + body + b".\r\nNOOP\r\n"
    replies = await in_thread(_pipelined, stack.smtp_address, [stream], 5)
    assert replies[3] == f"{LINE_TOO_LONG}".encode(), replies
    assert replies[4].startswith(b"250"), replies
    assert await queued(stack.config.nats.url) == []


def _inject_across_starttls(address: tuple[str, int], pki: Any) -> list[bytes]:
    sock = socket.create_connection(address, timeout=15)
    # Submission: AUTH only after TLS, so an (allowed) first message goes in over TLS first.
    read_replies(sock, 1)
    sock.sendall(b"EHLO c.test\r\nSTARTTLS\r\n")
    read_replies(sock, 2)
    tls = pki.client_context().wrap_socket(sock, server_hostname="relais.test")
    tls.sendall(ehlo_auth())
    read_replies(tls, 2)
    # Inside TLS: a message, then STARTTLS (refused: already active) and a pipelined MAIL/RCPT
    # in the same segment as the end-of-data line; both must run once, in order.
    tls.sendall(_transaction("one") + b"STARTTLS\r\nMAIL FROM:<news@acme.test>\r\nRCPT TO:<c@alpha.test>\r\n")
    got = read_replies(tls, 7)
    tls.sendall(b"DATA\r\n" + message(subject="two") + b".\r\nQUIT\r\n")
    got += read_replies(tls, 3)
    tls.close()
    return got


async def test_pipelined_after_end_inside_tls(make_ingress: Callable[..., Any], pki: Any) -> None:
    stack = await make_ingress(ingress=tls_sections(pki))
    got = await in_thread(_inject_across_starttls, stack.smtp_address, pki)
    codes = [r[:3] for r in got]
    assert codes == [b"250", b"250", b"354", b"250", b"503", b"250", b"250", b"354", b"250", b"221"], got
    envs = await queued(stack.config.nats.url)
    assert [list(e.recipients) for e in envs] == [["a@alpha.test"], ["c@alpha.test"]]


def _plaintext_injection(address: tuple[str, int], pki: Any) -> list[bytes]:
    sock = socket.create_connection(address, timeout=15)
    read_replies(sock, 1)
    sock.sendall(b"EHLO c.test\r\n")
    read_replies(sock, 1)
    body = b"Subject: one\r\n\r\nhi\r\n"
    sock.sendall(
        b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n" + body + b".\r\n"
        b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<fbl@bounces.relais.test>\r\n"
    )
    got = read_replies(sock, 5)  # MAIL, RCPT, 354, 250, 220 (the injected lines are not answered)
    tls = pki.client_context().wrap_socket(sock, server_hostname="relais.test")
    tls.sendall(b"EHLO c.test\r\nRCPT TO:<fbl@bounces.relais.test>\r\nQUIT\r\n")
    got += read_replies(tls, 3)
    tls.close()
    return got


async def test_plaintext_injected_after_end_and_starttls_is_dropped(
    make_ingress: Callable[..., Any], pki: Any
) -> None:
    stack, [address] = await listening(
        make_ingress, tls_sections(pki, local_domains=["bounces.relais.test"]), {"mode": "inbound"}
    )
    got = await in_thread(_plaintext_injection, address, pki)
    assert [r[:3] for r in got] == [b"250", b"250", b"354", b"250", b"220", b"250", b"503", b"221"], got
    assert len(await queued_inbound(stack.config.nats.url)) == 1
