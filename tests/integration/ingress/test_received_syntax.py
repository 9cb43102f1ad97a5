"""The Received: field Relais writes, in RFC 5321 4.4's syntax: an IPv6 client's address as an
address literal (`[IPv6:...]`, 4.1.3, as Postfix writes it), and the time stamp with a numeric
zone (4.4: "explicit offsets ... rather than time zone names"; "GMT" is RFC 5322 4.3's obs-zone,
which a generator must not write). A relay network's client, which sent no AUTH, is not said to
have authenticated ("ESMTPA" is ESMTP with SMTP AUTH, RFC 3848); a HELO session is "SMTP", and a
transaction with SMTPUTF8 "UTF8SMTP" (RFC 6531 3.7.3), as Postfix writes them."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress import headers
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    in_thread,
    listener,
    login,
    queued,
    read_replies,
)
from tests.support.relais import ACCOUNT, message

CLIENT = "2001:db8:1::25"
# RFC 5322 3.3 date-time with a numeric zone, ending the field.
_STAMP = re.compile(r";\s+\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$")


def _send_as(
    address: tuple[str, int], client_ip: str, greeting: bytes = b"EHLO c.test\r\n", mail_options: bytes = b""
) -> list[bytes]:
    """A relay-network message from `client_ip` (named by a PROXY header): the last reply lines."""
    with socket.create_connection(address, timeout=15) as sock:
        sock.sendall(f"PROXY TCP6 {client_ip} ::1 40000 587\r\n".encode())
        sock.sendall(greeting + b"MAIL FROM:<news@acme.test>" + mail_options)
        sock.sendall(b"\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n")
        replies = read_replies(sock, 4 + greeting.count(b"\r\n"))
        sock.sendall(message() + b".\r\nQUIT\r\n")
        return replies + read_replies(sock, 2)


async def _queued_received(nats_url: str) -> str:
    [env] = await queued(nats_url)
    head, _ = headers.split_message(env.body.inline or b"")
    return headers.HeaderBlock(head).first("received") or ""


async def _relay_network_ingress(make_ingress: Callable[..., Any]) -> tuple[Any, str]:
    listen = free_listen()
    ingress = await make_ingress(
        ingress={
            "relay_networks": ["2001:db8::/32"],
            "relay_networks_account": ACCOUNT,
            "listeners": [ListenerConfig(listen=listen, proxy_protocol=True, proxy_from=["127.0.0.0/8"])],
        }
    )
    return ingress, listen


async def test_received_names_an_ipv6_client_and_a_numeric_zone(make_ingress: Callable[..., Any]) -> None:
    ingress, listen = await _relay_network_ingress(make_ingress)
    replies = await in_thread(_send_as, listener(ingress, listen), CLIENT)
    assert replies[-2].startswith(b"250 "), replies
    received = await _queued_received(ingress.config.nats.url)
    assert f"from c.test ([IPv6:{CLIENT}])" in received, received
    assert _STAMP.search(received), received
    assert " with ESMTP id " in received and "authenticated" not in received, received


@pytest.mark.parametrize(
    ("greeting", "mail_options", "protocol"),
    [
        (b"HELO c.test\r\n", b"", "SMTP"),
        (b"EHLO c.test\r\n", b" SMTPUTF8", "UTF8SMTP"),
    ],
)
async def test_received_names_the_protocol_used(
    make_ingress: Callable[..., Any], greeting: bytes, mail_options: bytes, protocol: str
) -> None:
    ingress, listen = await _relay_network_ingress(make_ingress)
    replies = await in_thread(_send_as, listener(ingress, listen), CLIENT, greeting, mail_options)
    assert replies[-2].startswith(b"250 "), replies
    received = await _queued_received(ingress.config.nats.url)
    assert f" with {protocol} id " in received, received


async def test_received_names_smtputf8_after_auth(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def send() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test", ["SMTPUTF8"])
            smtp.rcpt("a@alpha.test")
            return smtp.data(message())

    assert (await in_thread(send))[0] == 250
    received = await _queued_received(ingress.config.nats.url)
    assert " with UTF8SMTPA id " in received and f"(authenticated as {ACCOUNT})" in received, received
