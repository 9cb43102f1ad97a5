"""SMTP client sessions: open a connection from a source IP, honour the TLS policy, run
transactions with per-recipient outcomes, and stay reusable (RSET) for the next message.

Protocol only: which replies mean what; no JetStream, no shaping here. Errors are typed by what
the caller does next: `TryNextHost` (this MX cannot take it now: the next one may) versus a
transaction result with per-recipient outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from services.core import sockets
from services.core.outcome import Deferred, Outcome, Reply, outcome_for
from services.delivery import pipelining
from services.delivery.draining import Stopping
from services.delivery.message_data import (
    DotReply,
    MessageData,
    UnansweredDot,
    drop_connection,
    message_data,
    send_data,
)
from services.delivery.tls_policy import TLS_FAILED, TLS_NOT_OFFERED, TlsPolicy
from services.delivery.wire_addresses import WireEnvelope, mail_parameters

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
    # The reply after the final dot only (DeliveryConfig.data_done_timeout says why it is longer).
    data_done_timeout: float = 600.0
    starttls: bool = True
    tls_verify: bool = False
    tls_ca_file: str = ""


class TryNextHost(Exception):
    """This host could not take the message now (connection failure, TLS policy, 4xx before RCPT).

    `remote` says whether the reply came from the server (push-back rules apply) or from Relais.
    `bind_failed` means the local source address could not be used at all.
    """

    def __init__(self, reply: Reply, *, remote: bool = False, bind_failed: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.remote = remote
        self.bind_failed = bind_failed


class StaleConnection(Exception):
    """A connection reused without RSET was found closed (or closing, 421) at MAIL: nothing was
    sent on it, so the transaction may simply go over another connection."""


# A connection whose last transaction ended cleanly and that was used this recently is reused
# without an RSET probe: one round trip (and write) less per message, as Postfix's cached
# sessions go. A server that closed it meanwhile is noticed at MAIL (StaleConnection).
REUSE_WITHOUT_PROBE = 2.0


@dataclass
class TransactionResult:
    outcomes: list[Outcome]
    # Replies the server sent in this transaction that were not 2xx (push-back candidates).
    remote_replies: list[Reply] = field(default_factory=list)
    # The connection is not fit for another message (lost, timed out, or the server said 421).
    broken: bool = False
    # The message's final dot went and no reply to it could be read (lost, timed out, or no
    # SMTP reply): the server may have taken it, and the retry may deliver it twice (RFC 1047).
    maybe_taken: bool = False


# Loading the CA store takes about 20 ms of CPU, and every STARTTLS needs a context: one per
# kind is shared by all connections, and made again after an hour so that a renewed CA bundle
# is read without a restart (Postfix's smtp processes, reused up to max_use, do about the same).
_CONTEXT_LIFETIME = 3600.0
_contexts: dict[tuple[bool, str], tuple[float, ssl.SSLContext]] = {}


def client_tls_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """The client context for STARTTLS, shared (see `_contexts`): do not modify it."""
    now = time.monotonic()
    made = _contexts.get((verify, ca_file))
    if made is not None and now - made[0] < _CONTEXT_LIFETIME:
        return made[1]
    ctx = _new_tls_context(verify, ca_file)
    _contexts[(verify, ca_file)] = (now, ctx)
    return ctx


def _new_tls_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    if not verify:
        # Opportunistic TLS (RFC 7435): encrypt even when the certificate cannot be checked.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reply_of(exc: aiosmtplib.SMTPResponseException, command: str) -> Reply:
    return Reply.parse(exc.code, exc.message, command)


# What each stage expects, as Postfix reads it: EHLO/HELO 250 (aiosmtplib refuses other 2xx, and
# HELO is then tried); MAIL 250; RCPT any 2xx (RFC 5321 names 250 and 251; some servers say 252);
# DATA any 3xx (RFC 5321 names 354); the message any 2xx.
_EHLO_OK = tuple(range(200, 300))
_MAIL_OK = (250,)
_RCPT_OK = tuple(range(200, 300))
_DATA_GO = tuple(range(300, 400))
_TAKEN = tuple(range(200, 300))


def protocol_error(command: str, got: str) -> Reply:
    """What a server's reply that fits nothing is deferred with (Postfix: "protocol error")."""
    return Reply(451, "4.5.0", f"SMTP protocol error: unexpected reply to {command}: {got}", command)


# Postfix's words for a deferral after the final dot that no reply settled (smtp_proto.c).
MAY_BE_SENT_TWICE = "message may be sent more than once"


def _misplaced(code: int, expected: tuple[int, ...]) -> bool:
    """A reply that is neither what the command expects nor a refusal (4xx/5xx)."""
    return code not in expected and not 400 <= code < 600


_LOST = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError)


class Connection:
    """One open SMTP session from `source` to `address` (MX `host`), good for several messages."""

    def __init__(
        self, smtp: aiosmtplib.SMTP, source: Source, host: str, address: str, *, data_done_timeout: float
    ) -> None:
        self.smtp = smtp
        self.source = source
        self.host = host
        self.address = address
        self.data_done_timeout = data_done_timeout
        self._stopping: Callable[[], bool] | None = None  # the current transaction's
        self.tls_version = ""
        self.tls_cipher = ""
        self.verified = False
        self.sent = 0
        self._awaiting = "MAIL"
        self.opened_at = time.monotonic()
        self.last_used = self.opened_at
        # No transaction is open on the server (after EHLO, or after DATA's final reply).
        self.clean = True
        # Checked out without an RSET probe since its last transaction.
        self.unprobed = False

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def satisfies(self, policy: TlsPolicy) -> bool:
        if policy.require and not self.tls_version:
            return False
        # Plaintext to an MX that offers no STARTTLS is allowed unless TLS is required; TLS
        # with an unchecked certificate is not, when the policy checks them.
        return not (policy.verify and self.tls_version and not self.verified)

    def needs_probe(self, now: float) -> bool:
        """Whether to RSET before the next transaction: a transaction may still be open (MAIL
        accepted, no DATA), or the connection sat idle long enough that the server may be gone."""
        return self.sent > 0 and (not self.clean or now - self.last_used > REUSE_WITHOUT_PROBE)

    async def transact(
        self,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        *,
        stale_is_retryable: bool = True,
        stopping: Callable[[], bool] | None = None,
        smtputf8: bool = False,
    ) -> TransactionResult:
        """MAIL, RCPT per recipient, DATA: pipelined (RFC 2920) when the server offers it, one
        round trip per command otherwise. Raises TryNextHost for a 4xx to MAIL, StaleConnection
        when an unprobed reused connection is dead at MAIL (if retryable), and Stopping when
        `stopping` says so before the message's final dot is sent. `smtputf8`: the sender
        submitted the message with SMTPUTF8 (`mail_parameters`)."""
        self._stopping = stopping
        self._awaiting = "MAIL"  # the command whose reply is awaited, named if the connection is lost
        unprobed, self.unprobed = self.unprobed, False
        stale_ok = unprobed and stale_is_retryable
        self.clean = False
        remote: list[Reply] = []
        # Each recipient's verdict as the server gave it (a refusal at RCPT, or the reply after
        # the data): what it said stands, however the transaction ends afterwards.
        outcomes: dict[str, Outcome] = {}
        try:
            content = message_data(body)
            server = f"{self.host}[{self.address}]"
            wire = mail_parameters(
                self.smtp, sender, recipients, body, size=content.size, server=server, smtputf8=smtputf8
            )
            if isinstance(wire, Reply):
                self.clean = True  # refused before MAIL: no transaction was opened
                return TransactionResult([outcome_for(r, wire, self.host) for r in recipients], [])
            if self.smtp.supports_extension("pipelining"):
                return await self._pipelined(wire, recipients, content, outcomes, remote, stale_ok)
            return await self._lockstep(wire, recipients, content, outcomes, remote, stale_ok)
        except (TryNextHost, StaleConnection, Stopping):
            raise
        except _LOST as exc:
            # Lost mid-transaction: the recipients the server refused keep its reply (a 5xx
            # bounces now, as Postfix settles a recipient at its RCPT reply); no other was
            # confirmed, so those are retried later.
            reply = Reply(451, "4.4.2", f"connection lost or timed out: {exc!r}", self._awaiting)
            sent_to: list[str] = []
            if isinstance(exc, UnansweredDot):
                sent_to = [r for r in recipients if r not in outcomes]
                reply = self._unanswered_dot(exc, sent_to)
            settled = [outcomes.get(r) or Deferred(r, reply, self.host) for r in recipients]
            return TransactionResult(settled, remote, broken=True, maybe_taken=bool(sent_to))
        except Exception as exc:
            # A reply nothing here foresaw, or a bug: deferred, so that the job is retried and
            # ends at retry.max_age like any other. Raised on, the job would come back from
            # the queue for ever, never reaching an outcome.
            log.exception("SMTP transaction with %s[%s] failed", self.host, self.address)
            drop_connection(self.smtp)
            reply = Reply(451, "4.3.0", f"local error in the SMTP transaction: {exc!r}", "DATA")
            return TransactionResult([Deferred(r, reply, self.host) for r in recipients], remote, broken=True)

    async def _lockstep(
        self,
        wire: WireEnvelope,
        recipients: Sequence[str],
        content: MessageData,
        outcomes: dict[str, Outcome],
        remote: list[Reply],
        stale_ok: bool,
    ) -> TransactionResult:
        smtp, host = self.smtp, self.host
        try:
            await smtp.mail(wire.sender, options=wire.options, encoding=wire.encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return self._refused_at_mail(exc.code, exc.message, recipients, remote, stale_ok)
        except _LOST as exc:
            if stale_ok:
                raise StaleConnection(repr(exc)) from exc
            raise
        accepted: list[str] = []
        self._awaiting = "RCPT"
        for rcpt, address in zip(recipients, wire.recipients, strict=True):
            try:
                await smtp.rcpt(address, encoding=wire.encoding)
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code in _RCPT_OK:  # aiosmtplib refuses all but 250 and 251
                    accepted.append(rcpt)
                    continue
                reply = _reply_of(exc, "RCPT")
                if _misplaced(reply.code, _RCPT_OK):
                    return self._protocol_error(recipients, remote, f"{exc.code} {exc.message}", "RCPT")
                if not self._refused_at_rcpt(rcpt, reply, recipients, outcomes, accepted, remote):
                    # 421: the server closed; the accepted ones cannot get the data either.
                    for taken in accepted:
                        outcomes[taken] = Deferred(taken, reply, host)
                    return self._finished(recipients, outcomes, remote)
        if not accepted:
            return self._finished(recipients, outcomes, remote)
        self._awaiting = "DATA"
        try:
            start = await smtp.execute_command(b"DATA")
        except aiosmtplib.SMTPResponseException as exc:  # not an SMTP reply at all
            return self._protocol_error(recipients, remote, f"{exc.code} {exc.message}", "DATA")
        return await self._data(start, content, recipients, accepted, outcomes, remote)

    async def _pipelined(
        self,
        wire: WireEnvelope,
        recipients: Sequence[str],
        content: MessageData,
        outcomes: dict[str, Outcome],
        remote: list[Reply],
        stale_ok: bool,
    ) -> TransactionResult:
        """MAIL, every RCPT and DATA in one write (RFC 2920 3.1: DATA ends the group), then their
        replies in order, each RCPT's mapped to its recipient as `_lockstep` does."""
        smtp, host = self.smtp, self.host
        commands = [
            pipelining.command_line(b"MAIL FROM:", wire.sender, wire.options, wire.encoding),
            *(pipelining.command_line(b"RCPT TO:", r, [], wire.encoding) for r in wire.recipients),
            b"DATA\r\n",
        ]
        try:
            replies = await pipelining.execute_pipelined(smtp, commands)
        except _LOST as exc:
            # Nothing can have been delivered: the data is only sent after the group's replies.
            if stale_ok:
                raise StaleConnection(repr(exc)) from exc
            if isinstance(exc, pipelining.GroupInterrupted):
                self._refusals_before_loss(recipients, exc.replies, outcomes, remote)
                read = len(exc.replies)
                self._awaiting = "MAIL" if not read else "RCPT" if read <= len(recipients) else "DATA"
            raise
        if len(replies) > len(commands):
            extra = replies[len(commands)]
            what = f"a reply too many in a pipelined group ({extra.code} {extra.message})"
            return self._protocol_error(recipients, remote, what, "DATA")
        mail = replies[0]
        data = replies[len(recipients) + 1] if len(replies) > len(recipients) + 1 else None
        if mail.code != 250:
            # RFC 2920: the server answers the RCPTs and DATA after a refused MAIL with errors
            # (read above), so no transaction is open, as after a refused MAIL without pipelining.
            if data is not None and data.code in _DATA_GO:
                # Yet this one opened the data phase: it would read our next commands as a message.
                smtp.close()
            return self._refused_at_mail(mail.code, mail.message, recipients, remote, stale_ok)
        accepted: list[str] = []
        misplaced = self._rcpt_replies(recipients, replies[1:], outcomes, accepted, remote)
        if misplaced is not None:
            return self._protocol_error(recipients, remote, misplaced, "RCPT")
        if data is not None and _misplaced(data.code, _DATA_GO):
            return self._protocol_error(recipients, remote, f"{data.code} {data.message}", "DATA")
        if not accepted:
            # No recipient: the server refuses the pipelined DATA (503/554), which is read above
            # and means nothing. Should it answer 354 anyway, a lone dot ends the empty message
            # (nothing to deliver there: its reply gets no more than any command's).
            if data is not None and data.code in _DATA_GO:
                with contextlib.suppress(aiosmtplib.SMTPResponseException):
                    await send_data(smtp, b".\r\n", transfer_timeout=smtp.timeout, reply_timeout=smtp.timeout)
            elif data is not None and data.code == 421:
                remote.append(Reply.parse(data.code, data.message, "DATA"))
            return self._finished(recipients, outcomes, remote)
        if data is None:
            # The server said 421 at an RCPT and closed: the accepted ones cannot get the data.
            closing = remote[-1]
            for rcpt in accepted:
                outcomes[rcpt] = Deferred(rcpt, closing, host)
            return self._finished(recipients, outcomes, remote)
        self._awaiting = "DATA"
        return await self._data(data, content, recipients, accepted, outcomes, remote)

    def _rcpt_replies(
        self,
        recipients: Sequence[str],
        responses: Sequence[aiosmtplib.SMTPResponse],
        outcomes: dict[str, Outcome],
        accepted: list[str],
        remote: list[Reply],
    ) -> str | None:
        """Pair a pipelined group's RCPT replies with their recipients, as `_lockstep` does one
        by one: a 2xx accepts, a refusal is recorded. Returns the first reply that fits neither
        (a protocol error), else None."""
        for rcpt, response in zip(recipients, responses, strict=False):
            if response.code in _RCPT_OK:
                accepted.append(rcpt)
                continue
            if _misplaced(response.code, _RCPT_OK):
                return f"{response.code} {response.message}"
            reply = Reply.parse(response.code, response.message, "RCPT")
            if not self._refused_at_rcpt(rcpt, reply, recipients, outcomes, accepted, remote):
                break
        return None

    def _refusals_before_loss(
        self,
        recipients: Sequence[str],
        replies: Sequence[aiosmtplib.SMTPResponse],
        outcomes: dict[str, Outcome],
        remote: list[Reply],
    ) -> None:
        """The refusals among the replies a pipelined group got before the connection went:
        recorded as in a whole group, unless MAIL was not accepted or a reply fits nothing
        (then none of them is trusted)."""
        if not replies or replies[0].code not in _MAIL_OK:
            return
        accepted: list[str] = []  # taken, but the data never went: deferred with the loss
        if self._rcpt_replies(recipients, replies[1:], outcomes, accepted, remote) is not None:
            outcomes.clear()

    async def _data(
        self,
        start: aiosmtplib.SMTPResponse,
        content: MessageData,
        recipients: Sequence[str],
        accepted: list[str],
        outcomes: dict[str, Outcome],
        remote: list[Reply],
    ) -> TransactionResult:
        """The transaction from the reply to DATA on: only a 3xx (354) starts the body, and only
        the reply after the final dot can deliver. A 2xx there means the replies are out of step
        with the commands (or the server is broken): nothing was delivered."""
        if _misplaced(start.code, _DATA_GO):
            return self._protocol_error(recipients, remote, f"{start.code} {start.message}", "DATA")
        if start.code in _DATA_GO:
            try:
                response = await send_data(
                    self.smtp,
                    content.wire,
                    transfer_timeout=self.smtp.timeout,
                    # Longer than any command's: a timeout here is the classic cause of
                    # duplicate delivery (RFC 1047), the server may have taken the message.
                    reply_timeout=self.data_done_timeout,
                    stopping=self._stopping,
                )
                reply = Reply.parse(response.code, response.message, "DATA")
                self.clean = True  # the final reply to the data ends the transaction
            except aiosmtplib.SMTPResponseException as exc:
                if _misplaced(exc.code, _TAKEN):
                    # Not a reply to the message (no SMTP code, or a 1xx/3xx): the server is out
                    # of step, and whether it took the message cannot be read from it. After the
                    # dot it may have, as when no reply comes (Postfix reads past such lines to
                    # the loss or timeout it reports "while sending end of data -- message may
                    # be sent more than once").
                    got = f"{exc.code} {exc.message.strip()}"  # aiosmtplib keeps a bad line's CRLF
                    return self._protocol_error(
                        recipients, remote, got, "DATA", after_dot=isinstance(exc, DotReply)
                    )
                reply = _reply_of(exc, "DATA")
                remote.append(reply)
        else:
            reply = Reply.parse(start.code, start.message, "DATA")
            remote.append(reply)
        for rcpt in accepted:
            outcomes[rcpt] = outcome_for(rcpt, reply, self.host)
        return self._finished(recipients, outcomes, remote)

    def _unanswered_dot(self, exc: UnansweredDot, sent_to: Sequence[str]) -> Reply:
        """What the recipients the message went to are deferred with when its final dot got no
        reply. The server may have taken it, so the retry may deliver it twice (RFC 1047): that
        cannot be avoided, only said, in the outcome and in the log, in Postfix's words."""
        if sent_to:
            log.warning(
                "no reply from %s[%s] to the final dot of a message to %d recipient(s) (%s): deferred, %s",
                self.host,
                self.address,
                len(sent_to),
                exc,
                MAY_BE_SENT_TWICE,
            )
        text = f"connection lost or timed out after the final dot ({exc})"
        return Reply(451, "4.4.2", f"{text} -- {MAY_BE_SENT_TWICE}", "DATA")

    def _protocol_error(
        self,
        recipients: Sequence[str],
        remote: list[Reply],
        got: str,
        command: str,
        *,
        after_dot: bool = False,
    ) -> TransactionResult:
        """A reply that fits neither its command nor a refusal: a 250 to DATA, a 252 to RCPT, or
        a reply too many. Replies may then be paired with the wrong commands, so none of this
        transaction's can be trusted: every recipient is deferred (nothing was sent after a
        354 we never got) and the connection closed, never reused to go on guessing.

        `after_dot`: it came after the message's final dot, which the server may have taken
        (RFC 1047): said as `_unanswered_dot` says it."""
        note = f" -- {MAY_BE_SENT_TWICE}" if after_dot else ""
        log.warning(
            "protocol error from %s[%s]: %r in reply to %s%s", self.host, self.address, got, command, note
        )
        self.smtp.close()
        reply = protocol_error(command, got)
        if after_dot:
            reply = dataclasses.replace(reply, text=reply.text + note)
        result = self._finished(recipients, {r: Deferred(r, reply, self.host) for r in recipients}, remote)
        result.maybe_taken = after_dot
        return result

    def _refused_at_mail(
        self, code: int, message: str, recipients: Sequence[str], remote: list[Reply], stale_ok: bool
    ) -> TransactionResult:
        """MAIL refused: every recipient fails for good (5xx), or the next host is tried (4xx)."""
        if _misplaced(code, _MAIL_OK):
            return self._protocol_error(recipients, remote, f"{code} {message}", "MAIL")
        if stale_ok and code == 421:
            raise StaleConnection(f"{code} {message}")
        self.clean = True  # refused: no transaction was opened
        reply = Reply.parse(code, message, "MAIL")
        if reply.is_permanent:
            # A transaction tried counts toward `messages_per_connection` like one that went
            # through: a sender the server refuses must not keep one connection for ever.
            refused = {r: outcome_for(r, reply, self.host) for r in recipients}
            return self._finished(recipients, refused, [reply])
        raise TryNextHost(reply, remote=True)

    def _refused_at_rcpt(
        self,
        rcpt: str,
        reply: Reply,
        recipients: Sequence[str],
        outcomes: dict[str, Outcome],
        accepted: list[str],
        remote: list[Reply],
    ) -> bool:
        """Record a refused recipient; False after a 421, when the rest are deferred."""
        remote.append(reply)
        if reply.code == 552:
            # RFC 5321 4.5.3.1.10: a 552 to RCPT ("too many recipients") is to be taken as 452.
            outcomes[rcpt] = Deferred(rcpt, reply, self.host)
        else:
            outcomes[rcpt] = outcome_for(rcpt, reply, self.host)
        if reply.code != 421:
            return True
        # The server is closing: the rest cannot be tried here.
        for rest in recipients[len(accepted) + len(outcomes) :]:
            outcomes[rest] = Deferred(rest, reply, self.host)
        return False

    def _finished(
        self, recipients: Sequence[str], outcomes: dict[str, Outcome], remote: list[Reply]
    ) -> TransactionResult:
        self.sent += 1
        self.last_used = time.monotonic()
        broken = any(r.code == 421 for r in remote) or not self.alive
        return TransactionResult([outcomes[r] for r in recipients], remote, broken)

    async def reset(self) -> bool:
        """RSET between messages on a reused connection; False when it is no longer usable."""
        try:
            await self.smtp.rset(timeout=min(30.0, self.smtp.timeout or 30.0))
            self.clean = True
            return True
        except (aiosmtplib.SMTPException, *_LOST):
            return False

    async def close(self) -> None:
        try:
            if self.smtp.is_connected:
                await self.smtp.quit(timeout=5)
        except Exception:
            self.smtp.close()


async def open_connection(
    address: str,
    host: str,
    source: Source,
    settings: SessionSettings,
    policy: TlsPolicy,
    *,
    reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Connection:
    """Connect from the source IP, EHLO, and STARTTLS as the policy demands; raises TryNextHost.

    `reconnect` is awaited before a second connection (plaintext, after an opportunistic
    STARTTLS handshake failed), so that it is paced as a new connection too. A STARTTLS the
    server refuses needs none (`_starttls`).

    `settings.connect_timeout` bounds the TCP connection only; the greeting is waited for as
    long as any reply, `command_timeout` (RFC 5321 4.5.3.2.1 gives it 5 minutes: servers
    delay it under load; Postfix waits smtp_helo_timeout for it, not smtp_connect_timeout).
    aiosmtplib times both with one value, so the socket is connected here and handed to it."""
    smtp = aiosmtplib.SMTP(
        local_hostname=source.ehlo, timeout=settings.command_timeout, start_tls=False, use_tls=False
    )
    try:
        sock = await _tcp_connect(address, settings.port, source.address, settings.connect_timeout)
        try:
            await smtp.connect(sock=sock)
        except BaseException:
            sock.close()  # aiosmtplib closes only the transport it has made of it, if any
            raise
    except aiosmtplib.SMTPConnectResponseError as exc:
        reply = Reply.parse(exc.code, exc.message, "CONNECT")
        raise TryNextHost(
            reply if reply.code >= 400 else Reply(421, "4.4.1", str(exc), "CONNECT"), remote=True
        ) from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        bind_failed = isinstance(cause, OSError) and cause.errno in (errno.EADDRNOTAVAIL, errno.EINVAL)
        why = str(exc) or type(exc).__name__  # a TimeoutError has no text of its own
        raise TryNextHost(
            Reply(421, "4.4.1", f"connect to {host}[{address}] failed: {why}", "CONNECT"),
            bind_failed=bind_failed,
        ) from exc
    pipelining.install(smtp)
    conn = Connection(smtp, source, host, address, data_done_timeout=settings.data_done_timeout)
    try:
        await _hello(conn)
        if not host or not policy.allows_host(host):
            raise TryNextHost(Reply(451, "4.7.5", f"{host} is not allowed by the TLS policy", "CONNECT"))
        offered = smtp.supports_extension("starttls")
        if policy.require and not offered:
            raise TryNextHost(TLS_NOT_OFFERED)
        if offered and (settings.starttls or policy.require):
            verify = policy.verify
            try:
                if not await _starttls(conn, client_tls_context(verify, settings.tls_ca_file), policy):
                    return conn  # refused: plaintext on this connection, as if not offered
                # RFC 3207 4.2: what the server offered before TLS is forgotten (aiosmtplib
                # empties its list), so ask again; else SMTPUTF8 and 8BITMIME look unsupported.
                # A refusal is the server's reply, as to any EHLO (TryNextHost for a 421, else
                # HELO): the handshake worked, so it is no cause to retry in plaintext (Postfix
                # recurses into its HELO dialogue). A lost session still is, below.
                await _hello(conn)
            except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                # A certificate that fails a check the policy asks for must not turn into
                # plaintext, which no one checks: that would reward whoever broke the handshake.
                if policy.require or policy.verify:
                    raise TryNextHost(
                        Reply(
                            TLS_FAILED.code,
                            TLS_FAILED.enhanced_status,
                            f"{TLS_FAILED.text}: {exc}",
                            "STARTTLS",
                        )
                    ) from exc
                # Opportunistic: the handshake failed, so start again in plaintext on a new connection.
                log.info("STARTTLS to %s[%s] failed (%r); retrying in plaintext", host, address, exc)
                smtp.close()
                if reconnect is not None:
                    await reconnect()
                return await open_connection(address, host, source, without_starttls(settings), policy)
            ssl_obj = smtp.get_transport_info("ssl_object")
            if ssl_obj is not None:
                cipher = ssl_obj.cipher()
                conn.tls_version = ssl_obj.version() or ""
                conn.tls_cipher = cipher[0] if cipher else ""
                conn.verified = verify
    except TryNextHost:
        await conn.close()
        raise
    except _LOST as exc:
        conn.smtp.close()
        raise TryNextHost(
            Reply(421, "4.4.2", f"{host}[{address}] lost during greeting: {exc!r}", "EHLO")
        ) from exc
    return conn


async def _tcp_connect(address: str, port: int, source_address: str, within: float) -> socket.socket:
    """A TCP connection to the MX address (`address`, `port`) from `source_address` ("": any),
    within `within` s."""
    family, kind, proto, _, peer = sockets.numeric_peers(address, port)[0]
    async with asyncio.timeout(within):
        return await sockets.connect(family, kind, proto, peer, source=source_address)


async def _starttls(conn: Connection, context: ssl.SSLContext, policy: TlsPolicy) -> bool:
    """STARTTLS and the handshake; False when the server refused the command and the session
    goes on in plaintext. A refusal is the server's reply, not a failed handshake (Postfix,
    smtp_helo): a 421, or a refusal followed by a hang-up, ends the try on this host, as does
    any refusal when TLS is required (TryNextHost, remote). Otherwise the connection is still
    in step after the refusal, so it carries the message in plaintext, as it would had the
    server not offered STARTTLS: no second connection, and no memory of a broken TLS (the
    server's answer may differ next time, and asking costs one round trip). Any other failure
    (handshake, lost connection, a reply that is neither 220 nor a refusal) is raised as is."""
    smtp = conn.smtp
    try:
        await smtp.starttls(tls_context=context, server_hostname=conn.host)
        return True
    except aiosmtplib.SMTPResponseException as exc:
        if not 400 <= exc.code < 600:
            raise
        refusal = _reply_of(exc, "STARTTLS")
        if exc.code == 421 or not smtp.is_connected or policy.require:
            raise TryNextHost(refusal, remote=True) from exc
    log.info("%s[%s] refused STARTTLS (%s); going on in plaintext", conn.host, conn.address, refusal)
    return False


async def _hello(conn: Connection) -> None:
    """EHLO; HELO when EHLO is refused with anything but 421, as Postfix does, and then no
    extension at all: no PIPELINING, STARTTLS, SIZE, 8BITMIME or SMTPUTF8, each then taken as
    not offered. Raises TryNextHost on a 421, when HELO is refused too, or when the server
    hung up after refusing EHLO (its reply, not the lost connection, is what it said)."""
    smtp = conn.smtp
    try:
        await smtp.ehlo()
        return
    except aiosmtplib.SMTPResponseException as exc:
        _raise_if_not_smtp(smtp, exc, "EHLO")  # out of step: HELO would be guessing too
        refusal = _reply_of(exc, "EHLO")
        if exc.code == 421 or not smtp.is_connected:
            raise TryNextHost(refusal, remote=True) from exc
        log.info("%s[%s] refused EHLO (%d %s); trying HELO", conn.host, conn.address, exc.code, exc.message)
    try:
        await smtp.helo()
    except aiosmtplib.SMTPResponseException as exc:
        _raise_if_not_smtp(smtp, exc, "HELO")
        raise TryNextHost(_reply_of(exc, "HELO"), remote=True) from exc
    except _LOST as exc:
        raise TryNextHost(refusal, remote=True) from exc


def _raise_if_not_smtp(smtp: aiosmtplib.SMTP, exc: aiosmtplib.SMTPResponseException, command: str) -> None:
    """A reply to EHLO or HELO that is neither a greeting nor a refusal (not SMTP at all: an
    HTTP server, say) is a protocol error: the connection is closed and the next host tried."""
    if _misplaced(exc.code, _EHLO_OK):
        smtp.close()
        raise TryNextHost(protocol_error(command, f"{exc.code} {exc.message}"), remote=True) from exc


def without_starttls(settings: SessionSettings) -> SessionSettings:
    return dataclasses.replace(settings, starttls=False)
