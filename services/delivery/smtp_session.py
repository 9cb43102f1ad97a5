"""One SMTP transaction to a destination, with per-recipient outcomes and MX failover.

Protocol only: which host to try and what each reply means; no JetStream here.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
import dns.asyncresolver

from services.core import dns as relais_dns
from services.core.outcome import NO_ROUTE, Deferred, Outcome, Reply, outcome_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a connection leaves from: local address (or any) and the EHLO name matching it."""

    address: str = ""
    ehlo: str = "localhost"


@dataclass(frozen=True, slots=True)
class SessionSettings:
    port: int = 25
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    starttls: bool = True
    tls_verify: bool = False


@dataclass
class AttemptResult:
    outcomes: list[Outcome]
    mx_host: str = ""
    address: str = ""
    tls: str = ""
    source_ip: str = ""
    notes: list[str] = field(default_factory=list)


class _TryNextHost(Exception):
    """This host could not take the message now (connection failure or a 4xx before RCPT)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _client_tls_context(verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not verify:
        # Opportunistic TLS (RFC 7435): encrypt even when the certificate cannot be checked.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reply_of(exc: aiosmtplib.SMTPResponseException, command: str) -> Reply:
    return Reply.parse(exc.code, exc.message, command)


async def send_message(
    *,
    resolver: dns.asyncresolver.Resolver,
    mx_hosts: Sequence[str],
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    source: Source,
    settings: SessionSettings,
) -> AttemptResult:
    """Try MX hosts in order (each of their addresses in turn) until one gives a verdict."""
    last = NO_ROUTE
    notes: list[str] = []
    for host in mx_hosts:
        try:
            addresses = await relais_dns.addresses(resolver, host)
        except relais_dns.DnsTemporaryError as exc:
            notes.append(f"{host}: {exc}")
            last = Reply(451, "4.4.3", f"Cannot resolve MX host {host}", "CONNECT")
            continue
        for address in addresses:
            try:
                return await _transaction(address, host, sender, recipients, body, source, settings)
            except _TryNextHost as exc:
                notes.append(f"{host}[{address}]: {exc.reply}")
                last = exc.reply
    return AttemptResult([Deferred(r, last) for r in recipients], notes=notes)


async def _transaction(
    address: str,
    host: str,
    sender: str,
    recipients: Sequence[str],
    body: bytes,
    source: Source,
    settings: SessionSettings,
) -> AttemptResult:
    smtp = aiosmtplib.SMTP(
        hostname=address,
        port=settings.port,
        local_hostname=source.ehlo,
        source_address=(source.address, 0) if source.address else None,
        timeout=settings.command_timeout,
        start_tls=False,
        use_tls=False,
    )
    try:
        await smtp.connect(timeout=settings.connect_timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        code = getattr(exc, "code", 421)
        raise _TryNextHost(
            Reply(code if 400 <= code < 500 else 421, "4.4.1", f"connect failed: {exc}", "CONNECT")
        ) from exc
    tls = ""
    try:
        try:
            await smtp.ehlo()
            if settings.starttls and smtp.supports_extension("starttls"):
                await smtp.starttls(
                    tls_context=_client_tls_context(settings.tls_verify), server_hostname=host
                )
                ssl_obj = smtp.get_transport_info("ssl_object")
                if ssl_obj is not None:
                    cipher = ssl_obj.cipher()
                    tls = f"{ssl_obj.version()} {cipher[0] if cipher else ''}".strip()
            await smtp.mail(sender or "")
        except aiosmtplib.SMTPResponseException as exc:
            reply = _reply_of(exc, "MAIL")
            if reply.is_permanent:
                return AttemptResult([outcome_for(r, reply, host) for r in recipients], host, address, tls)
            raise _TryNextHost(reply) from exc

        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                outcomes[rcpt] = outcome_for(rcpt, _reply_of(exc, "RCPT"), host)
        if accepted:
            try:
                response = await smtp.data(body)
                reply = Reply.parse(response.code, response.message, "DATA")
            except aiosmtplib.SMTPResponseException as exc:
                reply = _reply_of(exc, "DATA")
            for rcpt in accepted:
                outcomes[rcpt] = outcome_for(rcpt, reply, host)
        return AttemptResult([outcomes[r] for r in recipients], host, address, tls)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError) as exc:
        # Lost mid-transaction: nothing was confirmed, so every recipient is retried later.
        reply = Reply(451, "4.4.2", f"connection lost or timed out: {exc}", "DATA")
        return AttemptResult([Deferred(r, reply, host) for r in recipients], host, address, tls)
    finally:
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=5)
        except Exception:
            smtp.close()
