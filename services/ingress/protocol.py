"""aiosmtpd's SMTP protocol with the ingress' connection-level rules.

- every refusal carries an enhanced status code (aiosmtpd's built-in replies get one here);
- too many error replies in one session end it with 421;
- connections per client IP are gated (by the peer address, or the PROXY header's when enabled);
- an idle/command timeout says 421 4.4.2 before closing;
- implicit-TLS sessions expose their TLS facts like STARTTLS sessions do;
- the handler hears when a session ends, to release what the session held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Session

from services.core import metrics
from services.ingress import dsn
from services.ingress.limits import ConnectionGate
from services.ingress.replies import (
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    SHUTTING_DOWN,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
)

log = logging.getLogger(__name__)

# aiosmtpd's own replies that need a different code or text, not just an enhanced status.
_REWRITES = {
    "552 Error: message size exceeds fixed maximum message size": str(MESSAGE_TOO_BIG),
    "552 Error: Too much mail data": str(MESSAGE_TOO_BIG),
    "500 Line too long (see RFC5321 4.5.3.1.6)": str(LINE_TOO_LONG),
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
}
# RFC 3463 defaults for replies that arrive without an enhanced status code.
_DEFAULT_ENHANCED = {
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.5.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")


def enhance(reply: str) -> str:
    """The same reply with an enhanced status code (RFC 2034), for the single-line error replies."""
    if reply in _REWRITES:
        return _REWRITES[reply]
    if len(reply) < 4 or not reply[:3].isdigit() or reply[3] != " " or _HAS_ENHANCED.match(reply):
        return reply
    code = int(reply[:3])
    if code < 400:
        return reply
    text = reply[4:].removeprefix("Error: ").strip()
    return f"{code} {_DEFAULT_ENHANCED.get(code, f'{code // 100}.0.0')} {text}"


def is_error(reply: str) -> bool:
    return len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "45" and reply[:3] != "421"


class RelaisSMTP(SMTP):
    def __init__(
        self,
        handler: Any,
        *,
        gate: ConnectionGate,
        max_errors: int,
        implicit_tls: bool = False,
        registry: set[RelaisSMTP] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._registry = registry if registry is not None else set()
        # True from DATA until its reply is written: a draining replica waits for these.
        self.busy = False
        self._shutting_down = False
        # DSN parameters of the MAIL / RCPT command being handled: (RET, ENVID), (NOTIFY, ORCPT).
        self.dsn_mail = ("", "")
        self.dsn_rcpt = ("", "")
        self._gate = gate
        self._max_errors = max_errors
        self._errors = 0
        self._implicit_tls = implicit_tls
        self._gated_ip: str | None = None
        self._refused = False
        self._session_ended = False
        self._proxied = kwargs.get("proxy_protocol_timeout") is not None

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first and not self._proxied:
            peer = transport.get_extra_info("peername")
            if not self.admit(str(peer[0]) if peer else ""):
                # Refused before any SMTP state exists: say why, in one line, and hang up.
                transport.write(f"{TOO_MANY_CONNECTIONS}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                self._refused = True
                return
        previous = None if first else self.session
        super().connection_made(transport)
        self._registry.add(self)
        if first:
            metrics.SMTP_SESSIONS.labels("inbound").inc()
        if first and self._implicit_tls and self.session is not None:
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
        if previous is not None and self.session is not None:
            # STARTTLS: aiosmtpd starts a fresh session (RFC 3207 4.2), but the client behind a
            # PROXY header is still the same client; whatever the plaintext session held is freed.
            self.session.proxy_data = previous.proxy_data
            self._notify_closed(previous)

    def admit(self, ip: str) -> bool:
        """Count this connection against its client IP; False when that IP has too many."""
        if not self._gate.admit(ip):
            return False
        self._gated_ip = ip
        return True

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._registry.discard(self)
        if not self._session_ended:
            self._session_ended = True
            if self._gated_ip is not None:
                self._gate.release(self._gated_ip)
            if self.session is not None:
                self._notify_closed(self.session)
        super().connection_lost(error)

    def _notify_closed(self, session: Session) -> None:
        observer = getattr(self.event_handler, "session_closed", None)
        if observer is not None:
            observer(session)

    def _timeout_cb(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None and self.transport is not None:
            with contextlib.suppress(Exception):
                writer.write(f"{TIMEOUT}\r\n".encode())
        super()._timeout_cb()

    # -- DSN parameters (RFC 3461), which aiosmtpd would refuse with 555 --------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.dsn_mail = ("", "")
        if arg:
            arg, params = dsn.split_params(arg, dsn.MAIL_PARAMS)
            verdict, ret, envid = dsn.mail_verdict(params)
            if verdict:
                await self.push(str(verdict))
                return
            self.dsn_mail = (ret, envid)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.dsn_rcpt = ("", "")
        if arg:
            arg, params = dsn.split_params(arg, dsn.RCPT_PARAMS)
            verdict, notify, orcpt = dsn.rcpt_verdict(params)
            if verdict:
                await self.push(str(verdict))
                return
            self.dsn_rcpt = (notify, orcpt)
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.busy = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.busy = False

    def shut_down(self) -> None:
        """Say 421 4.3.2 and close; only between transactions (see `busy`)."""
        if self._shutting_down or self.transport is None:
            return
        self._shutting_down = True
        with contextlib.suppress(Exception):
            self.transport.write(f"{SHUTTING_DOWN}\r\n".encode())  # type: ignore[attr-defined]
        self.hang_up()

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- replies -------------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        reply = enhance(reply)
        metrics.observe_smtp_reply(reply)
        await super().push(reply)
        if reply.startswith("421"):
            self.hang_up()
            return
        if is_error(reply):
            self._errors += 1
            if self._max_errors and self._errors >= self._max_errors:
                log.info("%r: %d errors, closing", self.session.peer if self.session else None, self._errors)
                await super().push(str(TOO_MANY_ERRORS))
                self.hang_up()
