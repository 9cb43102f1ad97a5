"""aiosmtpd's SMTP protocol with the ingress' connection-level rules.

- every refusal carries an enhanced status code (aiosmtpd's built-in replies get one here);
- too many error replies in one session without an accepted message end it with 421 (recipients
  refused for the per-message limit are no errors, up to RECIPIENT_OVERSHOOT_LIMIT a transaction);
- AUTH mechanism names are taken in any case (`commands.py`, with each command's line limit);
- connections are gated from the moment they are accepted (`door.py`): per client IP, and per
  load balancer while a PROXY header is awaited; implicit TLS starts here, after the gate;
- DATA octets are reserved in the process's byte budget as they arrive (`budget.py`);
- AUTH lines may be as long as RFC 4954 allows, every other command keeps its own limit;
- an idle/command timeout says 421 4.4.2 before closing; a message that keeps arriving extends it
  (MIN_DATA_RATE);
- a client that half-closes its side has the commands it sent answered before the session ends;
- a line that is no command but a message header (a message sent without waiting for 354,
  whose DATA was refused) or an HTTP request ends the session: nothing after it runs;
- implicit-TLS sessions expose their TLS facts like STARTTLS sessions do;
- the handler hears when a session ends, to release what the session held;
- what aiosmtpd spends CPU on per message is done more cheaply with the same outcomes: its
  reflective per-connection set-up once per listener (`prototype.py`), `<local@domain>` arguments
  of MAIL/RCPT without the RFC 5322 parser (`commands.py`), a multi-line reply in one write, the
  message read in chunks (`data.py`), and one idle timer per session rather than one per command.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, Session, TLSSetupException, _Missing, syntax

from services.core import metrics
from services.ingress import dsn
from services.ingress.budget import ByteBudget, Reservation
from services.ingress.commands import (
    AUTH_LINE_LIMIT,
    auth_mechanism_upper,
    command_size_limits,
    non_smtp_command,
    plain_angle_addr,
    without_root_dot,
)
from services.ingress.data import DataState, read_data
from services.ingress.door import Door, start_tls
from services.ingress.limits import GatePass
from services.ingress.policy import helo_verdict
from services.ingress.prototype import Prototype
from services.ingress.replies import (
    AUTH_IN_TRANSACTION,
    AUTH_LINE_TOO_LONG,
    AUTH_NOT_ENABLED,
    INSUFFICIENT_STORAGE,
    NON_SMTP_COMMAND,
    SHUTTING_DOWN,
    TIMEOUT,
    TLS_ALREADY_ACTIVE,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK_COMMANDS,
    TOO_MANY_RECIPIENTS,
    enhance,
    is_error,
)

log = logging.getLogger(__name__)

# A line of a message: aiosmtpd's limit, with its CRLF (policy then holds lines to RFC 5322's 998).
DATA_LINE_LIMIT = SMTP.line_length_limit
# NOOP, RSET, HELP, VRFY, EXPN, HELO and EHLO a session may send between two accepted messages.
JUNK_COMMAND_LIMIT = 100
# While a message arrives, each octet extends the command timeout by 1/MIN_DATA_RATE s, never
# beyond a whole timeout from now (Postfix's smtpd_min_data_rate, 500): a large message on a slow
# link is taken, however long it takes, and a stalled one is cut off as before.
MIN_DATA_RATE = 500
# RCPTs refused for the per-message limit that are not errors (Postfix's
# smtpd_recipient_overshoot_limit): RFC 5321 4.5.3.1.10 has the client send the message to the
# recipients accepted and the rest in a later transaction.
RECIPIENT_OVERSHOOT_LIMIT = 1000

# A message refused while it was read: aiosmtpd's replies (which `push` turns into ours, see
# enhance()) and, when the byte budget had no room for it, Postfix's.
_REFUSED = {
    DataState.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    DataState.TOO_MUCH: "552 Error: Too much mail data",
    DataState.NO_ROOM: str(INSUFFICIENT_STORAGE),
}


_OVER_RECIPIENT_LIMIT = str(TOO_MANY_RECIPIENTS)
# aiosmtpd's reply to a line whose first word names no command, around that word.
_UNKNOWN_COMMAND = ('500 Error: command "', '" not recognized')


def _write_now(transport: Any, reply: str) -> None:
    """A reply written straight to the transport, bypassing `push`: counted here instead."""
    metrics.observe_smtp_reply(reply)
    transport.write(f"{reply}\r\n".encode())


class RelaisSMTP(SMTP):
    # The reader's limit: the longest line it reads whole, an AUTH line and its CR (aiosmtpd
    # splits lines at the LF). aiosmtpd builds its StreamReader with this; each command's own
    # limit is in `command_size_limits` (checked by aiosmtpd once the line is read), and the
    # lines of a message keep DATA_LINE_LIMIT.
    line_length_limit = AUTH_LINE_LIMIT + 1

    def __init__(
        self,
        handler: Any,
        *,
        door: Door,
        max_errors: int,
        budget: ByteBudget | None = None,
        registry: set[RelaisSMTP] | None = None,
        prototype: Prototype | None = None,
        normalise_line_endings: bool = False,
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
        self._door = door
        self._budget = budget if budget is not None else ByteBudget(0)
        # ingress.bare_line_endings = "normalise": the DATA reader makes bare CR/LF a CRLF.
        self._normalise = normalise_line_endings
        self._max_errors = max_errors
        self._errors = 0
        self._junk = 0
        # RCPTs of this transaction refused for the recipient limit (RECIPIENT_OVERSHOOT_LIMIT).
        self._overshoot = 0
        self._implicit_tls = door.tls is not None
        # This connection's count in the gate, from its accept on (None until then).
        self._gate_pass: GatePass | None = None
        self._refused = False
        self._session_ended = False
        # The client shut its side and is owed replies still (see `eof_received`).
        self._half_closed = False
        # Lines of a multi-line reply waiting for its last line (see `push`).
        self._continued: list[str] = []
        # When the idle timer is due, and whether the one armed has yet to fire (`_reset_timeout`).
        self._deadline = 0.0
        self._timer_armed = False

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate_pass is None and not self._enter(transport):
            return
        first = self.transport is None and self._original_transport is None
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

    def _enter(self, transport: asyncio.BaseTransport) -> bool:
        """The connection was just accepted: count it, or refuse it before any SMTP state
        exists; True when the SMTP session starts now (not after a TLS handshake)."""
        admitted = self._door.enter(transport)
        if not isinstance(admitted, GatePass):
            if admitted is not None:
                _write_now(transport, str(admitted))  # why, in one line, then hang up
            transport.close()
            self._refused = True
            return False
        self._gate_pass = admitted
        if self._implicit_tls:
            start_tls(self, transport, self._door, self._handshake_over)  # type: ignore[arg-type]
            return False
        return True

    def _handshake_over(self) -> None:
        if self.transport is None and not self._session_ended:
            # The handshake failed, timed out or lost its client: no session will end to free it.
            self._session_ended = True
            assert self._gate_pass is not None
            self._gate_pass.release()

    def admit(self, ip: str) -> bool:
        """A PROXY header named the client: count it by its IP; False when that IP has too many."""
        assert self._gate_pass is not None
        return self._gate_pass.admit(ip)

    def eof_received(self) -> bool | None:
        if self._answers_owed():
            # Half-closed (shutdown(SHUT_WR), `nc -N`) with commands still to answer: the client
            # reads on. As in Postfix, they are answered (a message's 250 included) before the
            # session ends (see `push`); aiosmtpd would cancel the session here and then.
            self._half_closed = True
            return asyncio.StreamReaderProtocol.eof_received(self)  # EOF to the reader, no cancel
        keep_open = super().eof_received()  # cancels the session's task
        if self._gate_pass is not None and self._gate_pass.waiting and self.transport is not None:
            # Gone before its PROXY header: aiosmtpd reads the header outside the part of its
            # task that closes the connection when cancelled, so the socket (and its place in
            # the load balancer's pending count) would stay until the PROXY timeout. A load
            # balancer's TCP health checks are such connections.
            self.transport.close()
            return False
        return keep_open

    @property
    def _inbound(self) -> bool:
        """The inbound listener's session: anyone's, without AUTH."""
        return bool(getattr(self.event_handler, "inbound", False))

    def _answers_owed(self) -> bool:
        """Whether a client that ended its input is still owed replies: a message being taken
        (`busy`), or a whole command line not read yet. Plain TCP only (asyncio's TLS cannot
        half-close), and never before a PROXY header."""
        if self.transport is None or self._tls_protocol is not None or self._implicit_tls:
            return False
        if self._gate_pass is None or self._gate_pass.waiting:
            return False
        return self.busy or self._line_waiting()

    def _line_waiting(self) -> bool:
        # The reader's buffer, as aiosmtpd itself reaches it (it clears it after STARTTLS).
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    async def _end_session(self) -> None:
        """Close, and end the session's task here when it is the caller, before a read fails."""
        self.hang_up()
        task = self._handler_coroutine
        if task is not None and task is asyncio.current_task():
            task.cancel()
            await asyncio.sleep(0)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._registry.discard(self)
        if not self._session_ended:
            self._session_ended = True
            if self._gate_pass is not None:
                self._gate_pass.release()
            if self.session is not None:
                self._notify_closed(self.session)
        super().connection_lost(error)

    def _notify_closed(self, session: Session) -> None:
        observer = getattr(self.event_handler, "session_closed", None)
        if observer is not None:
            observer(session)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, without a new one per command: a timer armed for an earlier time
        stays, and when it fires it arms itself again for the deadline the commands since moved
        it to. The session ends at the same moment as with aiosmtpd's cancel and `call_later` on
        every command (~4 µs each), whose cancelled timers also weighed on the loop's heap."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is not None and self._timer_armed and not handle.cancelled():
            if handle.when() <= self._deadline:
                return
            handle.cancel()  # a shorter timeout than the armed one (see `_data_deadline`)
        self._arm_timer()

    def _arm_timer(self) -> None:
        self._timer_armed = True
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_due)

    def _timer_due(self) -> None:
        assert self._timeout_handle is not None
        if self._deadline > self._timeout_handle.when():
            self._arm_timer()  # moved on since this timer was armed
            return
        self._timer_armed = False
        self._timeout_cb()

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
            line = await self._reader.readuntil()
            # The reader's limit lets a bare-LF line have one octet more.
            return None if len(line.rstrip(b"\r\n")) > AUTH_LINE_LIMIT else line
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
        if self._tls_protocol is not None and self.session is not None and self.session.ssl is None:
            # No TLS session began, yet the handshake "succeeded": asyncio resolves its waiter
            # without an error when we closed the connection during the handshake (the idle
            # timer, a drain), and nothing else would end this session or free its slot. Ended
            # as a failed handshake is.
            closed = ConnectionAbortedError("closed by the server during the STARTTLS handshake")
            raise TLSSetupException() from closed

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self._inbound:
            # Not advertised, so not taken, as in Postfix: aiosmtpd would answer 538 before
            # STARTTLS (send the credentials again over TLS) and 535 after (guess another one).
            await self.push(str(AUTH_NOT_ENABLED))
            return
        # RFC 4954 4: not during a transaction. A relay-network client could otherwise pass MAIL
        # FROM as one account and have the message queued as another's.
        if self.envelope is not None and self.envelope.mail_from:
            await self.push(str(AUTH_IN_TRANSACTION))
            return
        await super().smtp_AUTH(auth_mechanism_upper(arg))

    # -- MAIL / RCPT arguments ----------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        arg = without_root_dot(arg) if arg else arg
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
    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """aiosmtpd's parameter parsing, refusing a SIZE that is not ASCII digits (RFC 1870):
        aiosmtpd calls int() on whatever str.isdigit() takes ("²" among them), a traceback and
        451. None makes aiosmtpd answer its 501 syntax error."""
        result = super()._getparams(params)
        size = result.get("SIZE") if result else None
        if isinstance(size, str) and not (size.isascii() and size.isdigit()):
            return None
        return result

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.dsn_mail = ("", "")
        self._overshoot = 0
        if arg:
            # Only where AUTH is offered: elsewhere aiosmtpd refuses it as unknown (555).
            names = dsn.MAIL_PARAMS if self._inbound else (*dsn.MAIL_PARAMS, dsn.MAIL_AUTH_PARAM)
            arg, params = dsn.split_params(arg, names)
            auth = params.pop(dsn.MAIL_AUTH_PARAM, None)
            verdict, ret, envid = dsn.mail_verdict(params)
            verdict = verdict or (dsn.mail_auth_verdict(auth) if auth is not None else None)
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
            # Set-ups this module was not written for (no listener builds one): aiosmtpd's own
            # loop, without the byte budget and with the reader's line limit.
            await super().smtp_DATA(arg)
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
        # What the message holds of the byte budget, given back however DATA ends: queued,
        # refused, a failing hook, the connection gone or timed out (both cancel this task).
        # The inbound listener's sessions are anyone's; submission ones are an account's.
        reservation = self._budget.reservation(anonymous=self._inbound)
        try:
            reply = await self._receive(reservation)
        finally:
            reservation.release()
        if reply.startswith("250"):
            # The session is doing work: the errors and junk before this message are forgiven,
            # as in Postfix (smtpd_hard_error_limit counts errors made without delivering mail).
            self._junk = self._errors = 0
        await self.push(reply)

    async def _receive(self, reservation: Reservation) -> str:
        """The message, read and handed to the DATA hook; the reply to give."""
        assert self.envelope is not None
        try:
            state, content, line_stats = await read_data(
                self._reader,
                size_limit=self.data_size_limit,
                line_limit=DATA_LINE_LIMIT,
                reservation=reservation,
                arrived=self._data_deadline(),
                normalise=self._normalise,
            )
        except asyncio.IncompleteReadError:
            # Half-closed before the end-of-data line: nothing to queue, nothing more to answer.
            await self._end_session()
            raise
        except asyncio.CancelledError:
            # The connection went away during DATA (aiosmtpd's eof_received cancels us).
            self._writer.close()
            raise
        if state is not DataState.NOMINAL:
            self._set_post_data_state()
            return _REFUSED[state]
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
        return "250 OK" if status is MISSING else status

    def _data_deadline(self) -> Callable[[int], None]:
        """What moves the timeout on as a message's octets arrive (see MIN_DATA_RATE)."""
        loop, timeout = self.loop, self._timeout_duration
        deadline = loop.time() + timeout

        def arrived(octets: int) -> None:
            nonlocal deadline
            now = loop.time()
            deadline = min(now + timeout, deadline + octets / MIN_DATA_RATE)
            # Past the deadline the timer is about to fire anyway; 0 would mean "the default".
            self._reset_timeout(max(deadline - now, 1e-3))

        return arrived

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

    def _overshooting(self, reply: str) -> bool:
        """Whether `reply` refuses a recipient past the limit within the overshoot allowed: the
        client did nothing wrong (RFC 5321 4.5.3.1.10), so it is no error."""
        if reply != _OVER_RECIPIENT_LIMIT:
            return False
        self._overshoot += 1
        return self._overshoot <= RECIPIENT_OVERSHOOT_LIMIT

    def _non_smtp(self, reply: str) -> bool:
        """Whether `reply` is aiosmtpd's to a line that is no command but a message header
        line or an HTTP request (`commands.non_smtp_command`)."""
        head, tail = _UNKNOWN_COMMAND
        return reply.startswith(head) and non_smtp_command(reply[len(head) :].removesuffix(tail))

    async def _refuse_non_smtp(self) -> None:
        """The client sends something else than commands: a message it did not wait for 354 to
        send (RFC 2920 3.1) after its DATA was refused, or an HTTP request. As in Postfix, the
        session ends here; read on, a MAIL, RCPT and DATA further down that text would queue a
        message to recipients chosen by whoever wrote the text."""
        reply = str(NON_SMTP_COMMAND)
        log.info("%r: non-SMTP command, closing", self.session.peer if self.session else None)
        metrics.observe_smtp_reply(reply)
        await super().push(reply)
        await self._end_session()  # at once: what follows may be read already

    async def push(self, status: AnyStr) -> None:
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if self._non_smtp(reply):
            await self._refuse_non_smtp()
            return
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
        if is_error(reply) and not self._overshooting(reply):
            self._errors += 1
            if self._max_errors and self._errors >= self._max_errors:
                log.info("%r: %d errors, closing", self.session.peer if self.session else None, self._errors)
                metrics.observe_smtp_reply(str(TOO_MANY_ERRORS))
                await super().push(str(TOO_MANY_ERRORS))
                self.hang_up()
                return
        if self._half_closed and not self._line_waiting():
            # Every command the client sent before shutting its side has its answer.
            await self._end_session()
