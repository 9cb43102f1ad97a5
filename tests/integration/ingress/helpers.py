"""Clients and read-backs for the ingress scenarios."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
from collections.abc import Callable
from typing import Any

import nats

from services.core.embedded import free_port
from services.core.envelope import Envelope
from services.core.topology import INBOUND_STREAM, ROUTE_STREAM
from services.ingress.replies import Verdict
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, PASSWORD, RelaisStack


def tls_sections(pki: TestPKI, **ingress: Any) -> dict[str, Any]:
    return {"tls_cert_file": str(pki.server_pem), "tls_key_file": str(pki.server_key), **ingress}


def listener(stack: RelaisStack, listen: str) -> tuple[str, int]:
    assert stack.ingress is not None
    return stack.ingress.addresses[listen]


def free_listen() -> str:
    return f"127.0.0.1:{free_port()}"


async def queued(nats_url: str, stream: str = ROUTE_STREAM) -> list[Envelope]:
    """Every envelope currently in a work-queue stream, read by sequence (no consumer needed)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[Envelope] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(stream, seq)
                out.append(Envelope.from_msgpack(msg.data))
        return out
    finally:
        await nc.close()


async def queued_inbound(nats_url: str) -> list[Envelope]:
    return await queued(nats_url, INBOUND_STREAM)


def client(address: tuple[str, int], *, pki: TestPKI | None = None, starttls: bool = False) -> smtplib.SMTP:
    """A connected smtplib client that said EHLO (and STARTTLS'd when asked)."""
    smtp = smtplib.SMTP(*address, timeout=15)
    smtp.ehlo("client.test")
    if starttls:
        assert pki is not None
        smtp.starttls(context=pki.client_context())
        smtp.ehlo("client.test")
    return smtp


def login(smtp: smtplib.SMTP, user: str = ACCOUNT, password: str = PASSWORD) -> None:
    smtp.login(user, password)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking smtplib clients run in a thread so the in-process ingress keeps serving."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def reply(verdict: Verdict) -> tuple[int, bytes]:
    """A verdict as smtplib reports it: (code, b"<enhanced status> <text>")."""
    return verdict.code, f"{verdict.enhanced_status} {verdict.text}".encode()
