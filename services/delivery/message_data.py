"""The message after DATA: its bytes on the wire, the size MAIL declares for it (RFC 1870), and its
transfer, with the reply after the final dot waited for under a timeout of its own.

Protocol only, on aiosmtplib's connection; which reply means what is smtp_session.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from services.delivery.draining import Stopping

# What this module relies on of aiosmtplib beyond its public API (pinned in pyproject.toml):
# checked when a worker starts, so an upgrade that changes it stops the worker, rather than
# failing every message after its body was sent (and sending it again on every retry).
for _needed in ("_drain_helper", "_response_pending", "_response_waiter"):
    if not hasattr(SMTPProtocol, _needed) and _needed not in SMTPProtocol.__init__.__code__.co_names:
        raise ImportError(f"aiosmtplib's SMTPProtocol has no {_needed}: this aiosmtplib is not supported")

_BARE_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_SIZE_LIMIT = re.compile(r"[0-9]{1,20}")
_DOT = b".\r\n"
# How often a transfer waiting on a slow server looks whether the worker is stopping.
_STOP_POLL = 1.0
# The body is handed to the transport this much at a time, each piece only once the previous
# one has gone: a TLS transport encrypts all it is given at once into the socket's buffer, where
# flow control no longer sees it, so one write of the whole body could not be timed by progress.
_CHUNK = 256 * 1024


class UnansweredDot(aiosmtplib.SMTPServerDisconnected):
    """The connection was lost, or the reply timed out, after the message's final dot was
    written: the server may have taken the message, so its retry may deliver it a second time
    (RFC 1047). Raised in place of the loss, which it names."""


class DotReply(aiosmtplib.SMTPDataError):
    """The reply after the message's final dot, when it is not 250: a refusal, another 2xx, a
    code no reply to a message has (1xx, 3xx, 6xx...), or no SMTP reply at all (aiosmtplib's
    code -1: an HTTP line, binary noise, a line too long). Raised apart from a reply that came
    before the message's end: only once the dot went may the server have taken the message, so
    a reply that cannot be read there does not say it did not (RFC 1047)."""


@dataclass(frozen=True, slots=True)
class MessageData:
    # What goes on the wire after the 354: CRLF line ends, leading dots doubled, CRLF.CRLF last.
    wire: bytes
    # RFC 1870 4: the octets sent after the 354, CRLFs included, but not the doubled dots nor the
    # final ".CRLF". Exact, where Postfix declares an estimate from its queue file.
    size: int


def message_data(body: bytes) -> MessageData:
    """The body as it goes after DATA, and its size: the same bytes aiosmtplib's `data()` sends,
    but its two regex passes over the whole body were a third of delivery's CPU at 50 KB. Mail
    stored by the ingress already has CRLF line ends, which three `count`s confirm; only a body
    with a bare CR or LF takes the regex.
    """
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        body = _BARE_LINE_END.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    size = len(body)
    if body.startswith(b"."):
        body = b"." + body
    return MessageData(body.replace(b"\r\n.", b"\r\n..") + b".\r\n", size)


def size_limit(smtp: aiosmtplib.SMTP) -> int | None:
    """The server's SIZE limit from its EHLO reply: None when it offers no SIZE, 0 when it names
    no limit (or a malformed one, which Postfix only warns about and ignores)."""
    if not smtp.supports_extension("size"):
        return None
    words = smtp.esmtp_extensions.get("size", "").split()
    # ASCII digits only, and few enough for int(): "²" is a digit to str.isdigit(), and 5,000
    # digits are over int()'s limit; either raised, and the job came back for ever.
    return int(words[0]) if words and _SIZE_LIMIT.fullmatch(words[0]) else 0


async def send_data(
    smtp: aiosmtplib.SMTP,
    wire: bytes,
    *,
    transfer_timeout: float | None,
    reply_timeout: float | None,
    stopping: Callable[[], bool] | None = None,
) -> aiosmtplib.SMTPResponse:
    """The data after a 354, and the reply after its final dot; raises SMTPDataError for any
    reply but 250 (DotReply once the final dot was written, for what is no reply too),
    SMTPTimeoutError / SMTPServerDisconnected (connection closed) otherwise, and UnansweredDot
    for either once the final dot was written.

    The transfer is timed apart from that reply, as Postfix times smtp_data_xfer_timeout apart
    from smtp_data_done_timeout: a message the server stops reading is given up after
    `transfer_timeout` without progress; only one sent in full earns the reply's longer wait
    (DeliveryConfig.data_done_timeout says why it is longer). Once `stopping` says so, the rest
    is not sent: the connection is dropped before the final dot is written, so the server takes
    nothing, and Stopping is raised. A reply that comes before the message's end (a refusal
    mid-body) is the transaction's, and the connection is dropped.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # A message the transport takes at once goes in one write, dot included: between its body
    # and its dot nothing would yield to the loop, so no early reply and no stop could come in
    # between, and each write costs a send (SMTP writes were 13% of delivery's profile).
    whole = _taken_at_once(protocol, len(wire))
    body, dot = (wire, b"") if whole else (wire[: -len(_DOT)], wire[-len(_DOT) :])
    dot_written = False
    try:
        # A server may answer before it has read every byte (a refusal mid-body); aiosmtplib
        # drops data that arrives while no reply is expected.
        protocol._response_pending = True
        for start in range(0, len(body), _CHUNK):
            if _early_reply(protocol) is not None:
                break
            _check(stopping)
            protocol.write(body[start : start + _CHUNK])
            dot_written = whole
            await _drained(protocol, within=transfer_timeout, stopping=None if whole else stopping)
        if _early_reply(protocol) is None:
            if not dot_written:
                # The dot on its own, after a last look: past it the server may take the message.
                _check(stopping)
                protocol.write(dot)
                dot_written = True
                await _drained(protocol, within=transfer_timeout)
            response = await protocol.read_response(timeout=reply_timeout)
        else:
            response = _refused_early(smtp, protocol)
    except Stopping:
        drop_connection(smtp)  # before the dot: the server takes nothing
        raise
    except aiosmtplib.SMTPResponseException as exc:
        # What came could not be read as a reply (not SMTP, or too long).
        if not dot_written:
            raise
        raise DotReply(exc.code, exc.message) from exc
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        said = _early_reply(protocol)
        if said is None:
            drop_connection(smtp)
            if dot_written:
                raise UnansweredDot(repr(exc)) from exc
            raise
        # The server answered, then hung up (or the wait for more broke on its close): what
        # it said is the transaction's reply, the final one once the dot was written.
        response = said if dot_written else _refused_early(smtp, protocol)
        drop_connection(smtp)
    if response.code != 250:
        raise (DotReply if dot_written else aiosmtplib.SMTPDataError)(response.code, response.message)
    return response


def _taken_at_once(protocol: SMTPProtocol, size: int) -> bool:
    """Whether `size` bytes go in one piece that leaves flow control unpaused: the transport
    holds nothing yet and pauses only at its high-water mark (TLS pauses on reaching it, plain
    sockets beyond it), so draining after the write returns without waiting."""
    transport = protocol.transport
    if transport is None or transport.get_write_buffer_size():
        return False
    return size < min(_CHUNK, transport.get_write_buffer_limits()[1])


def _refused_early(smtp: aiosmtplib.SMTP, protocol: SMTPProtocol) -> aiosmtplib.SMTPResponse:
    """The reply a server gave before the message's end: its refusal. The connection is
    dropped, since the rest was not sent; a 2xx there fits nothing (no message was)."""
    said = _early_reply(protocol)
    drop_connection(smtp)
    if said is None or 200 <= said.code < 300:
        raise aiosmtplib.SMTPServerDisconnected(f"reply before the end of the message: {said}")
    return said


def _check(stopping: Callable[[], bool] | None) -> None:
    if stopping is not None and stopping():
        raise Stopping("worker stopping before the message's final dot")


def _early_reply(protocol: SMTPProtocol) -> aiosmtplib.SMTPResponse | None:
    """The reply the server has already sent while the message is still going, if any."""
    waiter = protocol._response_waiter
    if waiter is None or not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
        return None
    return waiter.result()


def drop_connection(smtp: aiosmtplib.SMTP) -> None:
    """Close the connection at once, discarding whatever is still queued, in asyncio and in the
    kernel (a reset, SO_LINGER 0): otherwise the rest of a message given up on, final dot
    included, could still reach the server (a transport's `close()` sends what is buffered, and
    the kernel sends what it holds), be delivered, and then again by the retry."""
    transport = smtp.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    smtp.close()


async def _drained(
    protocol: SMTPProtocol, *, within: float | None, stopping: Callable[[], bool] | None = None
) -> None:
    """Until the transport takes more (its flow control no longer pauses writing), giving up
    once `within` seconds pass without any of what it holds leaving (Postfix's "no progress"
    rule for the transfer: a large message on a slow link is not cut off while it moves), or
    once `stopping` says so (the final dot is not written yet when it is given). aiosmtplib's
    `write()` only queues the data, and its protocol keeps asyncio's flow control
    (`_drain_helper`, as StreamWriter.drain uses it) without a public way to wait on it."""
    transport = protocol.transport
    step = within if stopping is None or within is None else min(within, _STOP_POLL)
    while transport is not None:
        left = transport.get_write_buffer_size()
        waited = 0.0
        while True:
            try:
                async with asyncio.timeout(step):
                    await protocol._drain_helper()
                return
            except TimeoutError as exc:
                _check(stopping)
                waited += step or 0.0
                if transport.get_write_buffer_size() < left:
                    break  # progress: the "no progress" clock starts again
                if within is not None and waited >= within:
                    raise aiosmtplib.SMTPTimeoutError("Timed out sending the message data") from exc
