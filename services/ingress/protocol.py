"""aiosmtpd's SMTP protocol with the ingress' connection-level rules.

- every refusal carries an enhanced status code (aiosmtpd's built-in replies get one here);
- too many error replies in one session end it with 421;
- connections per client IP are gated (by the peer address, or the PROXY header's when enabled);
- an idle/command timeout says 421 4.4.2 before closing;
- implicit-TLS sessions expose their TLS facts like STARTTLS sessions do;
- the handler hears when a session ends, to release what the session held;
- what aiosmtpd spends CPU on per message is done more cheaply with the same outcomes: its
  reflective per-connection set-up once per listener (`prototype.py`), `<local@domain>` arguments of
  MAIL/RCPT without the RFC 5322 parser, a multi-line reply in one write, and the message read in
  chunks (`data.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Session, _Missing, syntax

from services.core import metrics
from services.core.addresses import PLAIN_ADDR_SPEC
from services.ingress import dsn
from services.ingress.data import DataState, read_data
from services.ingress.limits import ConnectionGate
from services.ingress.policy import helo_verdict
from services.ingress.prototype import Prototype
from services.ingress.replies import (
    AUTH_IN_TRANSACTION,
    AUTH_LINE_TOO_LONG,
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    SHUTTING_DOWN,
    TIMEOUT,
    TLS_ALREADY_ACTIVE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK_COMMANDS,
)

log = logging.getLogger(__name__)

_COMMAND_SIZE_LIMITS = {
    # SIZE (RFC 1870) 26, SMTPUTF8 (RFC 6531) 10, RET and ENVID (RFC 3461) 100.
    "MAIL": 512 + 26 + 10 + 100,
    "RCPT": 512 + 500,  # NOTIFY and ORCPT (RFC 3461)
    "AUTH": 12288,  # RFC 4954 4
}
# NOOP, RSET, HELP, VRFY, EXPN, HELO and EHLO a session may send between two accepted messages.
JUNK_COMMAND_LIMIT = 100

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


def command_size_limits() -> collections.defaultdict[str, int]:
    """Longest command line, per command, for one session: RFC 5321 4.5.3.1.4's 512 plus what
    each advertised extension adds (the reader's 1001-octet line limit still caps them all)."""
    return collections.defaultdict(lambda: SMTP.command_size_limit, _COMMAND_SIZE_LIMITS)


def _write_now(transport: Any, reply: str) -> None:
    """A reply written straight to the transport, bypassing `push`: counted here instead."""
    metrics.observe_smtp_reply(reply)
    transport.write(f"{reply}\r\n".encode())


def is_error(reply: str) -> bool:
    return len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "45" and reply[:3] != "421"


# `<dot-atom@host.name>` and what follows it. Anything else (quoted local parts, routes, address
# literals, comments, RFC 2047 lookalikes, non-ASCII) goes through aiosmtpd's RFC 5322 parser.
_PLAIN_ANGLE_ADDR = re.compile(rf"<({PLAIN_ADDR_SPEC})>[ \t]*")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of `<local@domain> params` when it is a plain dot-atom address,
    exactly as `email._header_value_parser.get_angle_addr` would return them; else None.

    aiosmtpd parses every MAIL/RCPT argument with the RFC 5322 header parser and also defines a
    typing.Protocol class on each call: about 10% of the ingress' CPU at 10 recipients a message.
    """
    match = _PLAIN_ANGLE_ADDR.match(arg)
    if match is None or "=?" in arg:
        return None
    rest = arg[match.end() :]
    if rest.startswith("("):  # a comment, which the parser would swallow
        return None
    return match.group(1), rest


class RelaisSMTP(SMTP):
    def __init__(
        self,
        handler: Any,
        *,
        gate: ConnectionGate,
        max_errors: int,
        implicit_tls: bool = False,
        registry: set[RelaisSMTP] | None = None,
        prototype: Prototype | None = None,
        **kwargs: Any,
    ) -> None:
        if prototype is None or not prototype.apply(self, handler, kwargs):
            super().__init__(handler, **kwargs)
            if prototype is not None:
                prototype.capture(self, handler, kwargs)
        # aiosmtpd's table is one dict on the class, cleared by every new connection and grown by
        # every EHLO: one session's EHLO would change another's limits.
        self.command_size_limits = command_size_limits()
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
        self._junk = 0
        self._implicit_tls = implicit_tls
        self._gated_ip: str | None = None
        self._refused = False
        self._session_ended = False
        self._proxied = kwargs.get("proxy_protocol_timeout") is not None
        # Lines of a multi-line reply waiting for its last line (see `push`).
        self._continued: list[str] = []

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first and not self._proxied:
            peer = transport.get_extra_info("peername")
            if not self.admit(str(peer[0]) if peer else ""):
                # Refused before any SMTP state exists: say why, in one line, and hang up.
                _write_now(transport, str(TOO_MANY_CONNECTIONS))
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
                _write_now(writer, str(TIMEOUT))
        super()._timeout_cb()

    # -- greeting and AUTH ---------------------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._too_much_junk() and not await self._refused_helo(hostname):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._too_much_junk() and not await self._refused_helo(hostname):
            await super().smtp_EHLO(hostname)
            self.command_size_limits = command_size_limits()  # undo aiosmtpd's additions

    # -- commands that do no work (Postfix's smtpd_junk_command_limit) ---------------------------

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_RSET(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_HELP(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_EXPN(arg)

    async def _too_much_junk(self) -> bool:
        """Each of these resets the idle timer without error: without a limit they would hold a
        session (and its connection slot) open forever. Counted until a message is accepted."""
        self._junk += 1
        if self._junk <= JUNK_COMMAND_LIMIT:
            return False
        await self.push(str(TOO_MANY_JUNK_COMMANDS))
        return True

    async def _refused_helo(self, hostname: str) -> bool:
        verdict = helo_verdict(hostname) if hostname else None  # aiosmtpd answers a missing one
        if verdict:
            await self.push(str(verdict))
        return verdict is not None

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> bytes | _Missing:
        """aiosmtpd's, except for a response line over the reader's limit: aiosmtpd lets
        `readline` raise (451 and a traceback) and then reads the rest of that line as commands.
        Here the line is read to its end and the exchange cancelled (RFC 4954 4: 500 5.5.6)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        line = await self._auth_line()
        if line is None:
            await self.push(str(AUTH_LINE_TOO_LONG))
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _auth_line(self) -> bytes | None:
        """The client's next line, or None when it was too long (and has been read past)."""
        try:
            return await self._reader.readuntil()
        except asyncio.IncompleteReadError as error:
            return error.partial  # the client went away; as aiosmtpd's readline
        except asyncio.LimitOverrunError as error:
            consumed = error.consumed
        while True:
            await self._reader.readexactly(consumed)
            try:
                await self._reader.readuntil()
                return None
            except asyncio.LimitOverrunError as error:
                consumed = error.consumed

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd would start TLS inside TLS, with a fresh session and idle timer each time.
        if self._tls_protocol is not None or self._implicit_tls:
            await self.push(str(TLS_ALREADY_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        # RFC 4954 4: not during a transaction. A relay-network client could otherwise pass MAIL
        # FROM as one account and have the message queued as another's.
        if self.envelope is not None and self.envelope.mail_from:
            await self.push(str(AUTH_IN_TRANSACTION))
            return
        await super().smtp_AUTH(arg)

    # -- MAIL / RCPT arguments ----------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = plain_angle_addr(arg) if arg else None
        if plain is None:
            return super()._getaddr(arg)
        address, rest = plain
        # The same local-part limit aiosmtpd applies after parsing.
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    # -- DSN parameters (RFC 3461), which aiosmtpd would refuse with 555 --------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
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

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
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

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, with the message read in chunks (`data.read_data`) instead of a
        Python loop per line; the checks before and the hand-over after are aiosmtpd's."""
        self.busy = True
        try:
            await self._data(arg)
        finally:
            self.busy = False

    async def _data(self, arg: str) -> None:
        if self._decode_data or "DATA" not in self._handle_hooks:
            await super().smtp_DATA(arg)  # set-ups this module was not written for
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            state, content, line_stats = await read_data(
                self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
            )
        except asyncio.CancelledError:
            # The connection went away during DATA (aiosmtpd's eof_received cancels us).
            self._writer.close()
            raise
        if state is not DataState.NOMINAL:
            # The replies aiosmtpd gives; `push` turns them into ours (enhance()).
            too_long = state is DataState.TOO_LONG
            await self.push(
                "500 Line too long (see RFC5321 4.5.3.1.6)" if too_long else "552 Error: Too much mail data"
            )
            self._set_post_data_state()
            return
        # decode_data=False on every listener: the handler gets the octets as sent.
        self.envelope.content = content
        self.envelope.original_content = content
        self.envelope.line_stats = line_stats  # type: ignore[attr-defined]
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            # Also after a failing hook (aiosmtpd answers it with handle_exception's 451): the
            # transaction is over either way, and the next MAIL must not get "nested MAIL".
            self._set_post_data_state()
        reply = "250 OK" if status is MISSING else status
        if reply.startswith("250"):
            self._junk = 0  # the session is doing work
        await self.push(reply)

    def shut_down(self) -> None:
        """Say 421 4.3.2 and close; only between transactions (see `busy`)."""
        if self._shutting_down or self.transport is None:
            return
        self._shutting_down = True
        with contextlib.suppress(Exception):
            _write_now(self.transport, str(SHUTTING_DOWN))
        self.hang_up()

    def hang_up(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- replies -------------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        reply = enhance(reply)
        if reply[3:4] == "-":
            # A continuation line ("250-PIPELINING") goes out with its reply's last line: aiosmtpd
            # writes every line on its own, ten socket writes for one EHLO answer.
            self._continued.append(reply)
            return
        metrics.observe_smtp_reply(reply)
        if self._continued:
            self._continued.append(reply)
            wire = "\r\n".join(self._continued)
            self._continued.clear()
        else:
            wire = reply
        await super().push(wire)
        if reply.startswith("421"):
            self.hang_up()
            return
        if is_error(reply):
            self._errors += 1
            if self._max_errors and self._errors >= self._max_errors:
                log.info("%r: %d errors, closing", self.session.peer if self.session else None, self._errors)
                metrics.observe_smtp_reply(str(TOO_MANY_ERRORS))
                await super().push(str(TOO_MANY_ERRORS))
                self.hang_up()
