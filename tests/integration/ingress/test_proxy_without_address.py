"""A PROXY header that names no client address (v1 UNKNOWN, v2 LOCAL, UNSPEC, AF_UNIX) must not
make the load balancer's own address the client's: with the load balancer inside relay_networks
that would relay without AUTH."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from services.core.config import ListenerConfig
from services.ingress.replies import AUTH_REQUIRED
from tests.integration.ingress.helpers import free_listen, in_thread, listener, plain, queued, tls_sections
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD, message

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
UNIX_PATHS = b"/run/haproxy/client.sock".ljust(108, b"\0") + b"/run/relais.sock".ljust(108, b"\0")
NO_ADDRESS = {
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v2-local": V2_SIG + bytes([0x20, 0x00, 0, 0]),
    "v2-unspec": V2_SIG + bytes([0x21, 0x00, 0, 0]),
    "v2-unix": V2_SIG + bytes([0x21, 0x31]) + len(UNIX_PATHS).to_bytes(2, "big") + UNIX_PATHS,
}


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while not _complete(data) and (chunk := sock.recv(4096)):
        data += chunk
    return data


def _complete(data: bytes) -> bool:
    lines = data.split(b"\r\n")
    return len(lines) > 1 and lines[-1] == b"" and lines[-2][3:4] == b" "


def _converse(
    address: tuple[str, int], preamble: bytes, commands: list[bytes], tls: ssl.SSLContext | None = None
) -> list[bytes]:
    """The last line of each reply: greeting, EHLO, [STARTTLS, EHLO], then one per command."""
    sock = socket.create_connection(address, timeout=10)
    try:
        sock.sendall(preamble)
        replies = [_reply(sock), _command(sock, b"EHLO c.test")]
        if tls is not None:
            replies.append(_command(sock, b"STARTTLS"))
            sock = tls.wrap_socket(sock, server_hostname="relais.test")
            replies.append(_command(sock, b"EHLO c.test"))
        replies += [_command(sock, command) for command in commands]
        return [r.rstrip(b"\r\n").rpartition(b"\r\n")[2] for r in replies]
    finally:
        sock.close()


def _command(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(command + b"\r\n")
    return _reply(sock)


@pytest.mark.parametrize("header", NO_ADDRESS.values(), ids=NO_ADDRESS.keys())
async def test_no_client_address_is_never_a_relay_network(
    make_ingress: Callable[..., Any], header: bytes
) -> None:
    proxied = free_listen()
    ingress = await make_ingress(
        ingress={
            "relay_networks": ["127.0.0.0/8"],
            "relay_networks_account": ACCOUNT,
            "listeners": [ListenerConfig(listen=proxied, proxy_protocol=True, proxy_from=["127.0.0.0/8"])],
        }
    )
    address = listener(ingress, proxied)
    mail = [b"MAIL FROM:<news@acme.test>", b"QUIT"]
    # A client the header names inside relay_networks relays without AUTH, as configured ...
    relayed = await in_thread(_converse, address, b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 587\r\n", mail)
    assert relayed[2].startswith(b"250"), relayed
    # ... but no address is not the load balancer's address.
    refused = await in_thread(_converse, address, header, mail)
    assert refused[0].startswith(b"220") and refused[2] == str(AUTH_REQUIRED).encode(), refused


async def test_an_af_unix_client_has_no_address_rather_than_a_path(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    proxied = free_listen()
    ingress = await make_ingress(
        ingress=tls_sections(pki, listeners=[ListenerConfig(listen=proxied, proxy_protocol=True)])
    )
    body = message().replace(b"\r\n.", b"\r\n..") + b"\r\n."
    commands = [
        f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}".encode(),
        b"MAIL FROM:<news@acme.test>",
        b"RCPT TO:<a@alpha.test>",
        b"DATA",
        body,
        b"QUIT",
    ]
    replies = await in_thread(
        _converse, listener(ingress, proxied), NO_ADDRESS["v2-unix"], commands, pki.client_context()
    )
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued"), replies
    [env] = await queued(ingress.config.nats.url)
    assert env.client_ip == ""
    received = (env.body.inline or b"").split(b"\r\n\t")[0]
    assert received == b"Received: from c.test", received
