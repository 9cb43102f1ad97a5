"""SMTP PIPELINING (RFC 2920) on top of aiosmtplib: several commands in one write, their replies
read back in order.

aiosmtplib's `SMTPProtocol` expects one reply per command awaited: it parses one reply per
read and drops data that arrives while no command is waiting or while a parsed reply has not
been picked up yet, so the second and later replies of a pipelined group would be lost.
`PipeliningProtocol` changes that only while a group is outstanding: every complete reply in
the buffer is queued (several in one read, multi-line ones included, nothing dropped), and
`execute_pipelined` pops them in order. Outside a group it is aiosmtplib's protocol unchanged.
Waiting still goes through aiosmtplib's `read_response`, so its timeout and its disconnect
detection (EOF, connection lost) apply to every reply.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol

from services.core.addresses import is_plain

# What the waiter is woken with while a group is outstanding: the replies themselves are queued.
_WAKE = aiosmtplib.SMTPResponse(-1, "")


class GroupInterrupted(aiosmtplib.SMTPServerDisconnected):
    """The connection was lost, or a reply did not come in time, part-way through a pipelined
    group. `replies` are the ones read before, each paired with its command in order: a
    recipient the server refused there keeps that refusal (Postfix settles it at its reply)."""

    def __init__(self, cause: aiosmtplib.SMTPException, replies: list[aiosmtplib.SMTPResponse]) -> None:
        super().__init__(f"{cause!r} after {len(replies)} replies of a pipelined group")
        self.replies = replies


class PipeliningProtocol(SMTPProtocol):
    # The replies (or parse errors) of the outstanding group, in order; None outside a group.
    # Class-level default: `install` turns an existing protocol into this class in place.
    _queued: deque[aiosmtplib.SMTPResponse | Exception] | None = None

    def data_received(self, data: bytes) -> None:
        queued = self._queued
        if queued is None or self._response_waiter is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        while True:
            try:
                response = self._read_response_from_buffer()
            except Exception as exc:  # a malformed reply: the group cannot be read further
                del self._buffer[:]
                queued.append(exc)
                break
            if response is None:
                break
            queued.append(response)
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            queued.append(
                aiosmtplib.SMTPResponseException(
                    aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"
                )
            )
        if queued and not self._response_waiter.done():
            self._response_waiter.set_result(_WAKE)

    async def execute_pipelined(
        self, commands: Sequence[bytes], reply_timeout: float | None = None
    ) -> list[aiosmtplib.SMTPResponse]:
        """Write `commands` (each a full line with CRLF) at once and read their replies in order;
        any reply already received beyond those is returned after them (more replies than
        commands: the caller cannot trust the pairing). Stops after a 421 (the server is
        closing: no further reply will come). Raises GroupInterrupted (an SMTPServerDisconnected
        holding the replies read so far) when the connection is lost or a reply does not come
        within `reply_timeout` (aiosmtplib's per-reply timeout).
        """
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            queued = self._queued = deque()
            replies: list[aiosmtplib.SMTPResponse] = []
            try:
                self.write(b"".join(commands))
                while len(replies) < len(commands):
                    if not queued:
                        # Wakes when replies are queued; raises on timeout, EOF or loss. A wake
                        # left over from replies already popped only costs one more turn.
                        try:
                            await self.read_response(timeout=reply_timeout)
                        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
                            raise GroupInterrupted(exc, replies) from exc
                        continue
                    reply = queued.popleft()
                    if isinstance(reply, Exception):
                        raise reply
                    replies.append(reply)
                    if reply.code == aiosmtplib.SMTPStatus.domain_unavailable:
                        break
                else:
                    replies.extend(self._surplus(queued))
            finally:
                self._queued = None
                self._response_pending = False
                # A wake set after the last reply was popped must not answer the next command.
                waiter = self._response_waiter
                if waiter is not None and waiter.done() and self.transport is not None:
                    self._response_waiter = self._loop.create_future()
        return replies

    def _surplus(self, queued: deque[aiosmtplib.SMTPResponse | Exception]) -> list[aiosmtplib.SMTPResponse]:
        """What arrived beyond one reply per command, as far as it has arrived: a server (or a
        proxy) that answers one command twice shifts every later reply onto the wrong command.
        A partial reply counts as one, with code -1."""
        surplus = [r for r in queued if isinstance(r, aiosmtplib.SMTPResponse)]
        if self._buffer:
            surplus.append(aiosmtplib.SMTPResponse(-1, bytes(self._buffer).decode("utf-8", "replace")))
        return surplus


def install(smtp: aiosmtplib.SMTP) -> None:
    """Make a connected SMTP's protocol a PipeliningProtocol.

    aiosmtplib builds its protocol inline in `SMTP._create_connection` (no factory to pass), so
    the instance changes class in place: the subclass adds no state of its own beyond a class
    default, and behaves as its parent until `execute_pipelined` is called.
    """
    protocol = smtp.protocol
    if protocol is not None and type(protocol) is SMTPProtocol:
        protocol.__class__ = PipeliningProtocol


async def execute_pipelined(
    smtp: aiosmtplib.SMTP, commands: Sequence[bytes]
) -> list[aiosmtplib.SMTPResponse]:
    """`PipeliningProtocol.execute_pipelined` with the SMTP's timeout; closes the connection on
    loss, timeout or a 421, as `SMTP.execute_command` does."""
    protocol = smtp.protocol
    if not isinstance(protocol, PipeliningProtocol):
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        replies = await protocol.execute_pipelined(commands, reply_timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:
        # A malformed reply: the rest of the group cannot be paired any more, as if lost.
        smtp.close()
        raise aiosmtplib.SMTPServerDisconnected(f"unreadable reply in a pipelined group: {exc}") from exc
    if replies and replies[-1].code == aiosmtplib.SMTPStatus.domain_unavailable:
        smtp.close()
    return replies


def quoted(address: str) -> str:
    """`<address>` exactly as aiosmtplib's quote_address makes it.

    quote_address returns a plain address as it is; its parseaddr pass, there for display forms
    such as "Name <a@b>", cost several percent of delivery's CPU per message.
    """
    if is_plain(address):
        return f"<{address}>"
    return quote_address(address)


def command_line(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    """`MAIL FROM:<a> OPT...` / `RCPT TO:<a>` as aiosmtplib's `mail()` and `rcpt()` build them,
    with the same refusal of control characters (an address must not smuggle a command)."""
    args = [verb + quoted(address).encode(encoding), *(o.encode("ascii") for o in options)]
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"
