"""The aiosmtpd adapter: each hook gathers facts, asks policy for a verdict, and answers."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import time
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from opentelemetry.trace import SpanKind

from services.core.accounts import verify_password
from services.core.config import AccountConfig, Config
from services.core.envelope import new_message_id
from services.core.telemetry import tracer
from services.ingress import policy
from services.ingress.handoff import Handoff, Submission

log = logging.getLogger(__name__)

_AUTH_CACHE_SECONDS = 300.0


class Authenticator:
    """AUTH PLAIN/LOGIN against the configured accounts.

    aiosmtpd calls this synchronously, and scrypt deliberately costs tens of milliseconds, so a
    successful check is remembered briefly: bulk senders authenticate on every connection.
    """

    def __init__(self, accounts: dict[str, AccountConfig]) -> None:
        self._accounts = accounts
        self._verified: dict[str, float] = {}

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        account = self._accounts.get(username)
        if account is None or account.disabled:
            return AuthResult(success=False, handled=False)
        key = hashlib.sha256(
            b"\0".join([auth_data.login, auth_data.password, account.password_hash.encode()])
        ).hexdigest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return AuthResult(success=True, auth_data=username)
        if not verify_password(auth_data.password.decode("utf-8", "replace"), account.password_hash):
            return AuthResult(success=False, handled=False)
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[key] = now + _AUTH_CACHE_SECONDS
        return AuthResult(success=True, auth_data=username)


def received_header(
    *, helo: str, peer_ip: str, hostname: str, message_id: str, account: str, tls: tuple[str, str] | None
) -> bytes:
    with_ = "ESMTPSA" if tls else "ESMTPA"
    tls_part = f"\r\n\t(using {tls[0]} with cipher {tls[1]})" if tls else ""
    return (
        f"Received: from {helo or 'unknown'} ([{peer_ip}]){tls_part}\r\n"
        f"\t(authenticated as {account})\r\n"
        f"\tby {hostname} (Relais) with {with_} id {message_id};\r\n"
        f"\t{email.utils.formatdate(localtime=False, usegmt=True)}\r\n"
    ).encode()


class IngressHandler:
    def __init__(self, config: Config, handoff: Handoff) -> None:
        self._config = config
        self._handoff = handoff

    def _account(self, session: Session) -> tuple[str, AccountConfig | None]:
        name = session.auth_data if isinstance(session.auth_data, str) else ""
        return name, self._config.accounts.get(name) if name else None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        _, account = self._account(session)
        sender = "" if address == "<>" else address
        verdict = policy.sender_verdict(account, sender)
        if verdict:
            return str(verdict)
        # aiosmtpd needs a truthy mail_from to accept RCPT; "<>" stands for the null sender.
        envelope.mail_from = sender or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        verdict = policy.recipient_verdict(
            address, len(envelope.rcpt_tos), self._config.ingress.max_recipients
        )
        if verdict:
            return str(verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name, account = self._account(session)
        if account is None:
            return str(policy.SENDER_REQUIRED_AUTH)
        data = envelope.original_content or b""
        verdict = policy.content_verdict(data, self._config.ingress.bare_line_endings)
        if verdict:
            return str(verdict)
        if self._config.ingress.bare_line_endings == "normalise":
            data = policy.normalise_line_endings(data)
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        if sender:
            sender_domain = policy.domain_of(sender)
        else:
            # Null sender: the From: header is the only identity there is, so it must be owned.
            verdict = policy.from_header_verdict(account, data)
            if verdict:
                return str(verdict)
            sender_domain = policy.from_header_domains(data)[0]
        peer_ip = str(session.peer[0]) if session.peer else ""
        tls = _tls_facts(session)
        message_id = new_message_id()
        with tracer().start_as_current_span(
            "smtp receive",
            kind=SpanKind.SERVER,
            attributes={
                "relais.message_id": message_id,
                "relais.account": name,
                "relais.sender_domain": sender_domain,
                "client.address": peer_ip,
                "relais.recipient_count": len(envelope.rcpt_tos),
            },
        ) as span:
            header = received_header(
                helo=session.host_name or "",
                peer_ip=peer_ip,
                hostname=self._config.ingress.hostname,
                message_id=message_id,
                account=name,
                tls=tls,
            )
            meta = {"tls": f"{tls[0]} {tls[1]}"} if tls else {}
            submission = Submission(
                account=name,
                sender=sender,
                recipients=tuple(envelope.rcpt_tos),
                sender_domain=sender_domain,
                data=header + data,
                client_ip=peer_ip,
                meta=meta,
            )
            reply = await self._handoff.queue(submission, message_id=message_id, span=span)
            span.set_attribute("smtp.reply", reply[:3])
            return reply


def _tls_facts(session: Session) -> tuple[str, str] | None:
    ssl_obj = session.ssl
    if not ssl_obj:
        return None
    try:
        obj = ssl_obj.get("ssl_object") if isinstance(ssl_obj, dict) else None
        if obj is not None:
            cipher = obj.cipher()
            return obj.version() or "TLS", cipher[0] if cipher else "unknown"
    except Exception:  # pragma: no cover - purely informational
        log.debug("could not read TLS facts", exc_info=True)
    return ("TLS", "unknown")
