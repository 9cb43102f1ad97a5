"""Destination MX sinks: aiosmtpd servers on 127.0.0.x that record what they receive.

Each sink listens on its own loopback address, so several "remote MXs" can share one port
number, as real MXs all listen on 25:

    port = free_port("127.0.0.2", "127.0.0.3")  # services.core.embedded
    with SMTPSink("127.0.0.2", port) as mx1, SMTPSink("127.0.0.3", port) as mx2:
        ...

A refused connection needs no helper: any 127.0.0.x address with nothing listening on the
port (e.g. 127.0.0.4 while only .2 and .3 have sinks) answers SYN with RST right away. A
timeout is what `delay_data` or DNSServer.set_drop() are for.

aiosmtpd quirks worth knowing when asserting:
- a null reverse-path arrives as mail_from == "<>", not "";
- MAIL parameters are upper-cased ("BODY=8BITMIME", "SMTPUTF8", "SIZE=123");
- DATA lines longer than 1000 bytes (with CRLF) are refused with "500 Line too long".
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

TEMPFAIL_REPLY = "451 4.3.0 Try again later"
RCPT_OK_REPLY = "250 OK"
DATA_OK_REPLY = "250 2.0.0 OK: queued"
_DATA_SIZE_LIMIT = 64 * 1024 * 1024
_POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted transaction, as the sink saw it."""

    peer: tuple[str, int]
    helo: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # Exactly the bytes after dot-unstuffing, CRLF line endings kept.
    tls: bool
    received_at: float
    mail_options: list[str]

    def parsed(self) -> email.message.EmailMessage:
        """The message parsed with the modern email policy, for header assertions."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP that tells the sink when its connection ends (for peak concurrency) and
    which commands arrived together in one read (pipelining)."""

    def data_received(self, data: bytes) -> None:
        self.event_handler.record_read(data)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.event_handler.count_disconnection()


class _SinkController(Controller):
    """Controller that counts accepted connections: aiosmtpd builds one SMTP per connection."""

    def factory(self) -> SMTP:
        self.handler.count_connection()
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


class SMTPSink:
    """An aiosmtpd MX on (host, port) with programmable replies.

    The behaviour attributes may be changed at any time, also while a client is connected;
    they are read when the command arrives. DATA is answered in this order: delay_data,
    then tempfail_data, then data_reply, else accepted and recorded in `messages`. aiosmtpd
    calls the DATA handler after the final dot, so `delay_data` stalls the reply after the dot.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        hostname: str | None = None,
        smtputf8: bool = True,
        pipelining: bool = False,
        size_limit: int = _DATA_SIZE_LIMIT,
    ) -> None:
        if require_tls and tls_context is None:
            raise ValueError("require_tls needs a tls_context to offer STARTTLS with")
        self.host = host
        self.port = port
        # Without an explicit name aiosmtpd calls socket.getfqdn(), which can block on DNS.
        self.hostname = hostname or f"sink-{host.replace('.', '-').replace(':', '-')}.test"
        self.tls_context = tls_context
        self.require_tls = require_tls
        self.smtputf8 = smtputf8
        # Advertise PIPELINING (RFC 2920) in the EHLO reply. aiosmtpd reads commands line by
        # line, so it serves a pipelined group correctly whether advertised or not.
        self.pipelining = pipelining
        # Advertised as EHLO's "SIZE <limit>" (RFC 1870) and enforced by aiosmtpd; 0: no SIZE.
        self.size_limit = size_limit
        # What EHLO is answered with instead of the extensions (e.g. a 502 from a HELO-only MX).
        self.ehlo_reply: str | None = None
        # The command verbs of every read that began with MAIL: ["MAIL", "RCPT", "DATA"] is one
        # pipelined group; ["MAIL"] a command sent on its own.
        self.mail_reads: list[list[str]] = []
        self.messages: list[ReceivedMessage] = []
        self.tempfail_data = 0
        # What a tempfailed DATA is answered with (e.g. a provider's 421 throttling text).
        self.tempfail_reply = TEMPFAIL_REPLY
        self.data_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.rcpt_default: str | None = None
        # What MAIL is answered with instead of 250 (e.g. a 550 for a blocked sender).
        self.mail_reply: str | None = None
        self.delay_data = 0.0
        self.delay_rcpt = 0.0  # seconds each RCPT waits for its reply (a tarpit before DATA)
        self.connections = 0
        self.connected_at: list[float] = []  # time.monotonic() of each accepted connection
        self.open_sessions = 0
        self.peak_sessions = 0  # most client connections open at the same time
        self.data_commands = 0  # DATA commands that reached the handler, accepted or not.
        self._lock = threading.Lock()
        self._controller: _SinkController | None = None

    def start(self) -> None:
        if self._controller is not None:
            return
        controller = _SinkController(
            self,
            hostname=self.host,
            port=self.port,
            server_hostname=self.hostname,
            ready_timeout=10.0,
            decode_data=False,
            data_size_limit=self.size_limit,
            enable_SMTPUTF8=self.smtputf8,
            tls_context=self.tls_context,
            require_starttls=self.require_tls,
        )
        controller.start()
        self._controller = controller
        # Controller.start() connects once to check readiness; that is not a client.
        with self._lock:
            self.connections = 0
            self.connected_at.clear()
            self.open_sessions = 0
            self.peak_sessions = 0

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def count_connection(self) -> None:
        with self._lock:
            self.connections += 1
            self.connected_at.append(time.monotonic())
            self.open_sessions += 1
            self.peak_sessions = max(self.peak_sessions, self.open_sessions)

    def count_disconnection(self) -> None:
        with self._lock:
            self.open_sessions = max(0, self.open_sessions - 1)

    def clear(self) -> None:
        """Forget received messages and counters, keeping the programmed behaviour."""
        with self._lock:
            self.messages.clear()
            self.connections = 0
            self.connected_at.clear()
            self.data_commands = 0
            self.mail_reads.clear()

    # -- waiting --------------------------------------------------------------------------

    def _snapshot(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self.messages)

    def _timeout_error(self, count: int, got: list[ReceivedMessage], timeout: float) -> TimeoutError:
        return TimeoutError(
            f"sink {self.host}:{self.port} received {len(got)} of {count} messages within {timeout}s "
            f"(connections={self.connections}, DATA commands={self.data_commands}, "
            f"tempfail_data left={self.tempfail_data}, data_reply={self.data_reply!r}); "
            f"received: {[(m.mail_from, m.rcpt_tos) for m in got]}"
        )

    def wait_for(self, count: int, timeout: float = 30.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages arrived; returns a snapshot of them.

        Blocks the calling thread: from an async test use async_wait_for, or the event loop
        that would deliver the messages stalls too.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = self._snapshot()
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise self._timeout_error(count, got, timeout)
            time.sleep(_POLL_INTERVAL)

    # Same signature as wait_for on purpose, rather than leaving the timeout to asyncio.timeout().
    async def async_wait_for(self, count: int, timeout: float = 30.0) -> list[ReceivedMessage]:  # noqa: ASYNC109
        """Like wait_for, polling with asyncio.sleep so the caller's loop keeps running."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._snapshot()
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise self._timeout_error(count, got, timeout)
            await asyncio.sleep(_POLL_INTERVAL)

    def record_read(self, data: bytes) -> None:
        if data[:5].upper() == b"MAIL ":
            verbs = [line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode() for line in data.splitlines()]
            with self._lock:
                self.mail_reads.append(verbs)

    # -- aiosmtpd hooks (run in the controller's thread) ------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # Implementing the hook makes remembering the EHLO name our job, not aiosmtpd's.
        session.host_name = hostname
        if self.ehlo_reply is not None:
            return [self.ehlo_reply]
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        # Implementing the hook makes taking the sender our job, not aiosmtpd's.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.delay_rcpt > 0:
            await asyncio.sleep(self.delay_rcpt)
        # Lowercased on both sides, so a test's "Bad@X.test" key still matches.
        replies = {rcpt.lower(): reply for rcpt, reply in self.rcpt_replies.items()}
        reply = replies.get(address.lower(), self.rcpt_default) or RCPT_OK_REPLY
        # Implementing the hook makes accepting the recipient our job, not aiosmtpd's.
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.data_commands += 1
        if self.delay_data > 0:
            await asyncio.sleep(self.delay_data)
        with self._lock:
            if self.tempfail_data > 0:
                self.tempfail_data -= 1
                return self.tempfail_reply
        if self.data_reply is not None:
            return self.data_reply
        peer: Any = session.peer
        message = ReceivedMessage(
            peer=(str(peer[0]), int(peer[1])),
            helo=session.host_name or "",
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            # session.ssl is the TLS transport's extra-info dict, set only after STARTTLS.
            tls=bool(session.ssl),
            received_at=time.time(),
            mail_options=list(envelope.mail_options),
        )
        with self._lock:
            self.messages.append(message)
        return DATA_OK_REPLY

    def __enter__(self) -> SMTPSink:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
