"""PROXY protocol per listener (client IPs survive a load balancer) and certificate reload."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.config import ListenerConfig
from tests.integration.ingress.helpers import free_listen, in_thread, listener, plain, queued, tls_sections
from tests.support.certs import TestPKI, make_test_pki
from tests.support.relais import ACCOUNT, PASSWORD, message

PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _session(
    address: tuple[str, int], preamble: bytes, tls: ssl.SSLContext | None = None, source: str = ""
) -> list[bytes]:
    sock = socket.create_connection(address, timeout=10, source_address=(source, 0) if source else None)
    try:
        try:
            sock.sendall(preamble)
            data = sock.recv(200)
        except (ConnectionResetError, BrokenPipeError):
            return [b""]  # closed before the preamble arrived: a peer outside proxy_from
        if not data.startswith(b"220"):
            return [data]
        if tls is not None:
            sock.sendall(b"EHLO c.test\r\n")
            while not _complete(data := sock.recv(4096)):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert sock.recv(200).startswith(b"220")
            sock = tls.wrap_socket(sock, server_hostname="relais.test")
        body = message().replace(b"\r\n.", b"\r\n..")
        sock.sendall(
            f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()
            + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
            + body
            + b"\r\n.\r\nQUIT\r\n"
        )
        while chunk := sock.recv(4096):
            data += chunk
        return data.split(b"\r\n")
    finally:
        sock.close()


def _complete(data: bytes) -> bool:
    lines = data.split(b"\r\n")
    return len(lines) > 1 and lines[-2][3:4] == b" "


def _v2_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = (
        socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    )
    return PROXY_V2_SIG + bytes([0x21, 0x11]) + len(addresses).to_bytes(2, "big") + addresses


async def test_proxy_protocol_v1_and_v2_carry_the_client_ip(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    proxied, direct = free_listen(), free_listen()
    ingress = await make_ingress(
        ingress=tls_sections(
            pki,
            listeners=[
                ListenerConfig(listen=proxied, proxy_protocol=True),
                ListenerConfig(listen=direct),
            ],
        )
    )
    tls = pki.client_context()
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 587\r\n"
    lines = await in_thread(_session, listener(ingress, proxied), v1, tls)
    assert any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines), lines
    lines = await in_thread(
        _session, listener(ingress, proxied), _v2_header("198.51.100.9", "10.0.0.1", 1, 587), tls
    )
    assert any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines), lines
    # Without the header a proxied listener says nothing and hangs up.
    assert await in_thread(_session, listener(ingress, proxied), b"EHLO c.test\r\n") == [b""]
    envs = await queued(ingress.config.nats.url)
    assert [e.client_ip for e in envs] == ["203.0.113.7", "198.51.100.9"]
    assert b"([203.0.113.7])" in (envs[0].body.inline or b"")


async def test_a_proxy_header_counts_only_from_the_load_balancer(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    # From anyone else, a PROXY header could name any client address, a relay network's
    # included: such a connection is closed before the greeting.
    proxied = free_listen()
    ingress = await make_ingress(
        ingress=tls_sections(
            pki, listeners=[ListenerConfig(listen=proxied, proxy_protocol=True, proxy_from=["127.0.0.2/32"])]
        )
    )
    v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 587\r\n"
    tls = pki.client_context()
    assert await in_thread(_session, listener(ingress, proxied), v1, tls, "127.0.0.3") == [b""]
    lines = await in_thread(_session, listener(ingress, proxied), v1, tls, "127.0.0.2")
    assert any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines), lines
    assert [e.client_ip for e in await queued(ingress.config.nats.url)] == ["203.0.113.7"]


async def test_a_loopback_proxy_listener_offers_no_plaintext_auth(make_ingress: Callable[..., Any]) -> None:
    # A loopback listener without certificates may take plaintext AUTH only because nothing
    # leaves the machine; behind PROXY protocol its clients are remote (a local load balancer).
    proxied = free_listen()
    ingress = await make_ingress(ingress={"listeners": [ListenerConfig(listen=proxied, proxy_protocol=True)]})

    def scenario() -> tuple[bytes, bytes]:
        sock = socket.create_connection(listener(ingress, proxied), timeout=10)
        with sock:
            sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 587\r\nEHLO c.test\r\n")
            data = b""
            while not data.endswith(b"250 HELP\r\n"):
                data += sock.recv(4096)
            sock.sendall(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode())
            return data, sock.recv(200)

    ehlo, auth = await in_thread(scenario)
    assert b"AUTH" not in ehlo, ehlo
    assert auth.startswith(b"538 5.7.11"), auth


async def test_proxy_protocol_client_ip_survives_starttls(
    make_ingress: Callable[..., Any], pki: TestPKI
) -> None:
    proxied = free_listen()
    ingress = await make_ingress(
        ingress=tls_sections(pki, listeners=[ListenerConfig(listen=proxied, proxy_protocol=True)])
    )
    v1 = b"PROXY TCP4 203.0.113.8 10.0.0.1 40000 587\r\n"
    lines = await in_thread(_session, listener(ingress, proxied), v1, pki.client_context())
    assert any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines), lines
    [env] = await queued(ingress.config.nats.url)
    assert env.client_ip == "203.0.113.8" and env.meta["tls_version"].startswith("TLSv1.")


async def test_certificate_files_are_reloaded(
    make_ingress: Callable[..., Any], pki: TestPKI, tmp_path: Path
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_pem, cert)
    shutil.copy(pki.server_key, key)
    ingress = await make_ingress(
        ingress={"tls_cert_file": str(cert), "tls_key_file": str(key), "tls_reload_interval": 0.2}
    )

    def peer_certificate(ctx: ssl.SSLContext) -> dict[str, Any]:
        with smtplib.SMTP(*ingress.smtp_address, timeout=10) as smtp:
            smtp.starttls(context=ctx)
            return smtp.sock.getpeercert()  # type: ignore[union-attr]

    first = await in_thread(peer_certificate, pki.client_context())
    # Rotate to a certificate from a new CA (as a renewed Kubernetes secret would).
    rotated = make_test_pki(tmp_path / "rotated")
    shutil.copy(rotated.server_pem, cert)
    shutil.copy(rotated.server_key, key)
    for _ in range(50):
        try:
            second = await in_thread(peer_certificate, rotated.client_context())
            break
        except ssl.SSLError:
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("the new certificate was never presented")
    assert first["serialNumber"] != second["serialNumber"]
