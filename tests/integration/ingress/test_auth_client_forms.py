"""AUTH as real clients and real attackers meet it: mechanism names in any case (RFC 5321 2.4,
as Postfix with Cyrus or Dovecot SASL takes them), LOGIN's challenges as those servers word
them, failed attempts from IPv6 counted per /64 (one host or site gets a whole /64, so counting
per address would give a guesser 2^64 counts), and a client address in IPv4-mapped form (a
dual-stack load balancer's PROXY header) taken as the IPv4 address it is."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress.replies import AUTH_INVALID, AUTH_OK, AUTH_THROTTLED
from tests.integration.ingress.helpers import (
    free_listen,
    in_thread,
    listener,
    plain,
    read_replies,
    tls_sections,
)
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD

LOCKOUT = 60.0


def _conversation(
    address: tuple[str, int], lines: list[bytes], preamble: bytes = b"", tls: ssl.SSLContext | None = None
) -> list[bytes]:
    """The last line of each reply: the greeting, [EHLO, STARTTLS,] then one per line sent (one
    at a time, after STARTTLS when `tls` is given)."""
    sock = socket.create_connection(address, timeout=15)
    try:
        sock.sendall(preamble)
        replies = read_replies(sock, 1)
        if tls is not None:
            sock.sendall(b"EHLO c.test\r\nSTARTTLS\r\n")
            replies += read_replies(sock, 2)
            sock = tls.wrap_socket(sock, server_hostname="relais.test")
        for line in lines:
            sock.sendall(line + b"\r\n")
            replies += read_replies(sock, 1)
        return replies
    finally:
        sock.close()


def _proxy_v1(client_ip: str) -> bytes:
    family = "TCP6" if ":" in client_ip else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {client_ip} {server} 40000 587\r\n".encode()


async def test_mechanism_names_in_any_case(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    plain_lower = [b"EHLO c.test", f"auth plain {plain(ACCOUNT, PASSWORD)}".encode()]
    login_mixed = [b"EHLO c.test", b"Auth Login", b64encode(ACCOUNT.encode()), b64encode(PASSWORD.encode())]
    plain_replies = await in_thread(_conversation, ingress.smtp_address, plain_lower)
    login_replies = await in_thread(_conversation, ingress.smtp_address, login_mixed)
    assert plain_replies[2] == str(AUTH_OK).encode(), plain_replies
    # As Postfix and Dovecot ask: clients (Go's common LOGIN helper, curl) compare the decoded
    # challenges with exactly these, and gave up on aiosmtpd's "User Name\0" (aiosmtpd #566).
    challenges = [b64decode(r.removeprefix(b"334 ")) for r in login_replies[2:4]]
    assert challenges == [b"Username:", b"Password:"], login_replies
    assert login_replies[4] == str(AUTH_OK).encode(), login_replies


@pytest.fixture
async def proxied(make_ingress: Callable[..., Any], pki: TestPKI) -> tuple[Any, tuple[str, int]]:
    listen = free_listen()
    ingress = await make_ingress(
        ingress=tls_sections(
            pki,
            auth_max_failures=2,
            auth_lockout=LOCKOUT,
            relay_networks=["10.0.0.0/8"],
            relay_networks_account=ACCOUNT,
            listeners=[ListenerConfig(listen=listen, proxy_protocol=True, proxy_from=["127.0.0.0/8"])],
        )
    )
    return ingress, listener(ingress, listen)


def _guess(
    address: tuple[str, int], tls: ssl.SSLContext, client_ip: str, user: str, password: str = "guess"
) -> bytes:
    lines = [b"EHLO c.test", f"AUTH PLAIN {plain(user, password)}".encode()]
    return _conversation(address, lines, _proxy_v1(client_ip), tls)[-1]


async def test_ipv6_guesses_are_counted_per_64(proxied: tuple[Any, tuple[str, int]], pki: TestPKI) -> None:
    _, address = proxied
    tls = pki.client_context()
    # Fixed windows: keep the attempts away from the end of one.
    if time.time() % LOCKOUT > LOCKOUT - 15:
        await asyncio.sleep(LOCKOUT - time.time() % LOCKOUT + 0.1)
    # A new address of the same /64 and a new username for each guess: neither the per-address
    # nor the per-username count would ever reach the limit.
    first = [await in_thread(_guess, address, tls, f"2001:db8:1:2::{n}", f"user{n}") for n in (1, 2)]
    assert first == [str(AUTH_INVALID).encode()] * 2, first
    third = await in_thread(_guess, address, tls, "2001:db8:1:2:ffff::3", "user3")
    assert third == str(AUTH_THROTTLED).encode(), third
    # The lock is the /64's: a client in another one logs in.
    other = await in_thread(_guess, address, tls, "2001:db8:1:3::1", ACCOUNT, PASSWORD)
    assert other == str(AUTH_OK).encode(), other


async def test_an_ipv4_mapped_client_address_is_its_ipv4_address(
    proxied: tuple[Any, tuple[str, int]],
) -> None:
    _, address = proxied
    lines = [b"EHLO c.test", b"MAIL FROM:<news@acme.test>"]
    # 10.1.2.3 is in relay_networks, however a dual-stack load balancer writes it.
    replies = await in_thread(_conversation, address, lines, _proxy_v1("::ffff:10.1.2.3"))
    assert replies[2].startswith(b"250"), replies
