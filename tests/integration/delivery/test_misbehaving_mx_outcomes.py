"""Misbehaving MXs against "every accepted message ends in exactly one final outcome; no second
copy to a recipient already accepted", over real sockets on loopback.

- No reply to the final dot (the connection lost, or the reply timed out): deferred, as Postfix
  does. The server may have taken the message, so the retry may deliver it twice (RFC 1047):
  unavoidable, and now said, in Postfix's words, in the deferral ("message may be sent more than
  once") and in a warning. Before, it read like any loss before the message, where nothing can
  have been delivered. Each such deferral, and each one for a line after the dot that is no
  reply to it (test_non_smtp_reply_to_data.py), counts once in
  `relais_delivery_possible_duplicates_total{pool,site}`, for operators to alert on. Before,
  nothing counted them.
- Every recipient accepted, then the message refused: one bounce each (5xx), or one deferral
  each and one retry that delivers (4xx).
- A 421 greeting, or a 421 at MAIL: the next MX host gets the message; the 421's connection is
  never reused.
- Replies a pipelined group does not expect: lines longer than 512 octets, multi-line replies
  whose lines carry different codes (the last line's counts, as in Postfix's smtp_chat.c), and
  a reply with no code at all.
- A pooled connection the server dropped while idle, with a close or silently: replaced, the
  message delivered.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence

import dns.asyncresolver
import pytest

from services.core.outcome import Bounced, Deferred, Delivered
from services.delivery import smtp_session
from services.delivery.connections import ConnectionPool
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import attempt, resolver_of
from tests.integration.delivery.test_connection_lost_after_partial_rcpt import (
    RECIPIENTS,
    GoesAwayAfterRcpts,
)
from tests.integration.delivery.test_data_reply_after_partial_rcpt import connect, read_message
from tests.support import prom
from tests.support.dns_server import DNSServer
from tests.support.raw_smtp import RawServer, ScriptedMX, serving
from tests.support.relais import asubmit, message, read_events, wait_for_events

BODY = b"Subject: misbehaving\r\n\r\nhello\r\n"
MAY_BE_TWICE = "may be sent more than once"
SETTLED = ("delivered", "deferred", "bounced")


def _verdicts(events: Sequence, domain: str) -> dict[str, list[str]]:
    """Each recipient at `domain` -> the kinds of the outcome events it got, in order."""
    seen: dict[str, list[str]] = {}
    for event in events:
        if event.kind in SETTLED:
            for rcpt in event.recipients:
                if rcpt.endswith(f"@{domain}"):
                    seen.setdefault(rcpt, []).append(event.kind)
    return seen


# -- no reply to the final dot ---------------------------------------------------------------


@pytest.fixture
async def going_away() -> AsyncIterator:
    async with serving(GoesAwayAfterRcpts) as start:
        yield start


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("when", ["DATA", "dot", "silent"])
async def test_no_reply_to_the_final_dot_defers_and_says_the_message_may_go_twice(
    going_away, caplog: pytest.LogCaptureFixture, when: str, pipelining: bool
) -> None:
    # "DATA": lost before any of the message went (nothing to warn about); "dot": the server read
    # the message to its dot and hung up; "silent": it read it and never answered (timeout).
    server = await going_away(when, pipelining=pipelining)
    conn = await connect(server, data_done_timeout=1.0)
    with caplog.at_level(logging.WARNING, logger=smtp_session.__name__):
        try:
            result = await conn.transact("a@acme.test", RECIPIENTS, BODY)
        finally:
            await conn.close()
    good, bad, busy = result.outcomes
    after_dot = when != "DATA"
    assert server.got_dot == after_dot
    assert isinstance(good, Deferred), "never delivered, never bounced: retried later"
    assert (good.reply.code, good.reply.enhanced_status, good.reply.command) == (451, "4.4.2", "DATA")
    assert (MAY_BE_TWICE in good.reply.text) == after_dot, good.reply
    # The recipients refused at RCPT got no copy: their own replies stand, without the note.
    assert isinstance(bad, Bounced) and isinstance(busy, Deferred)
    assert MAY_BE_TWICE not in busy.reply.text
    warned = [r for r in caplog.records if MAY_BE_TWICE in r.getMessage()]
    assert len(warned) == (1 if after_dot else 0), [r.getMessage() for r in caplog.records]
    assert result.maybe_taken == after_dot, "counted as a possible duplicate after the dot only"


class TakesItThenHangsUp(ScriptedMX):
    """An MX on (`host`, `port`) that takes the first message to its final dot and answers it
    with `first`: None hangs up without a reply (its 250 lost on the way, as far as the client
    can tell), a line that is no SMTP reply stands for a 250 garbled on the way. Answers 250 to
    every later one. Records every message it read."""

    def __init__(self, host: str, port: int, first: bytes | None = None) -> None:
        super().__init__(host=host, port=port)
        self.first = first
        self.bodies: list[bytes] = []

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        self.bodies.append(await read_message(reader))
        return self.first if len(self.bodies) == 1 else b"250 2.0.0 queued\r\n"


POSSIBLE_DUPLICATES = "relais_delivery_possible_duplicates_total"


@pytest.mark.parametrize(
    ("first", "enhanced"),
    [(None, "4.4.2"), (b"HTTP/1.1 400 Bad Request\r\n", "4.5.0")],
    ids=["no-reply", "no-smtp-reply"],
)
async def test_a_message_taken_without_a_reply_is_retried_and_the_second_copy_is_reported(
    make_stack, sink_port: int, first: bytes | None, enhanced: str
) -> None:
    # The duplicate cannot be avoided (the client cannot tell a lost 250 from a lost message);
    # what the promise asks is that it is not hidden: not in the event, and not in the metrics.
    # Delivery's collector reads the live workers: earlier tests' stopped ones go now, not
    # while this test counts.
    gc.collect()
    counted = prom.value(prom.scrape(), POSSIBLE_DUPLICATES, pool="default", site="alpha.test")
    async with serving(TakesItThenHangsUp) as start:
        server = await start("127.0.0.2", sink_port, first)  # mx.alpha.test
        stack = await make_stack()
        url = stack.config.nats.url
        rcpts = ["x@alpha.test", "y@alpha.test"]
        assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

        (deferred,) = await wait_for_events(url, "deferred", 1)
        assert sorted(deferred.recipients) == rcpts
        assert deferred.reply["enhanced"] == enhanced and MAY_BE_TWICE in deferred.reply["text"]
        (delivered,) = await wait_for_events(url, "delivered", 1)
        assert sorted(delivered.recipients) == rcpts and delivered.attempt == 2
        await asyncio.sleep(2.5)  # longer than a retry interval: nothing else may come
        now = prom.value(prom.scrape(), POSSIBLE_DUPLICATES, pool="default", site="alpha.test")
    assert len(server.bodies) == 2, "the copy the unreadable reply hid, and the retry's"
    assert _verdicts(await read_events(url), "alpha.test") == {r: ["deferred", "delivered"] for r in rcpts}
    assert now - counted == 1, "one message that may have gone twice, whatever its recipients"


# -- every recipient accepted, then the message refused --------------------------------------


@pytest.mark.parametrize(
    ("dot_reply", "kind"),
    [("554 5.6.0 content refused", "bounced"), ("452 4.3.1 out of space", "deferred")],
    ids=["5xx", "4xx"],
)
async def test_a_refused_message_after_every_rcpt_was_taken_settles_each_recipient_once(
    make_stack, make_sink, dot_reply: str, kind: str
) -> None:
    sink = make_sink("127.0.0.2")
    make_sink("127.0.0.9")  # the sender's MX, where the DSN lands
    sink.tempfail_data = 1  # the first message only (aiosmtpd answers DATA after the final dot)
    sink.tempfail_reply = dot_reply
    stack = await make_stack()
    url = stack.config.nats.url
    rcpts = ["a@alpha.test", "b@alpha.test", "c@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    # A bounce is an event per recipient (each gets its own DSN entry); a deferral one per attempt.
    first = await wait_for_events(url, kind, len(rcpts) if kind == "bounced" else 1)
    assert sorted(r for e in first for r in e.recipients) == rcpts
    assert {e.reply["code"] for e in first} == {int(dot_reply[:3])}
    if kind == "deferred":
        (got,) = await sink.async_wait_for(1)
        assert sorted(got.rcpt_tos) == rcpts, "retried together, in one transaction"
    await asyncio.sleep(2.5)  # longer than a retry interval: nothing else may come
    expected = ["bounced"] if kind == "bounced" else ["deferred", "delivered"]
    assert _verdicts(await read_events(url), "alpha.test") == {r: expected for r in rcpts}
    assert sink.data_commands == len(expected), "one message per attempt, no attempt after a bounce"
    assert len(sink.messages) == (0 if kind == "bounced" else 1)


# -- 421 at the greeting or at MAIL ----------------------------------------------------------


MX_HOSTS = ["mx1.four.test", "mx2.four.test"]


class Says421(RawServer):
    """An MX on (`host`, `port`) that says 421 and hangs up, `at` its greeting or at MAIL.
    Counts its connections."""

    def __init__(self, host: str, port: int, at: str, *, pipelining: bool) -> None:
        super().__init__(host, port)
        self.at = at
        self.pipelining = pipelining
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.at == "greeting":
                await self._closing(reader, writer)
                return
            writer.write(b"220 busy ESMTP\r\n")
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
                if verb == b"MAIL":
                    await self._closing(reader, writer)
                    return
                if verb == b"QUIT":
                    break
                if verb == b"EHLO":
                    writer.write(b"250-busy\r\n250 PIPELINING\r\n" if self.pipelining else b"250 busy\r\n")
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """421, then whatever the client still sends (a pipelined group's RCPT and DATA) until it
        closes: closed with unread input, the socket would reset and could take the 421 with it."""
        writer.write(b"421 4.7.0 too many connections, closing\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10.0)


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("at", ["greeting", "MAIL"])
async def test_a_421_sends_the_message_to_the_next_mx_and_its_connection_is_not_kept(
    dns_server: DNSServer, sink_port: int, make_sink, at: str, pipelining: bool
) -> None:
    dns_server.add("mx1.four.test", "A", "127.0.0.4")
    dns_server.add("mx2.four.test", "A", "127.0.0.5")
    backup = make_sink("127.0.0.5")
    async with serving(Says421) as start:
        busy = await start("127.0.0.4", sink_port, at, pipelining=pipelining)
        pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False))  # type: ignore[arg-type]
        resolver = resolver_of(dns_server)
        try:
            for i in range(2):
                result = await attempt(pool, resolver, MX_HOSTS, f"r{i}@four.test", "four.test")
                (outcome,) = result.outcomes
                assert isinstance(outcome, Delivered) and result.mx_host == "mx2.four.test", result
                assert [r.code for r in result.remote_replies] == [421], "the 421 is the server's: push-back"
        finally:
            await pool.close()
    assert busy.connections == 2, "a connection that said 421 is never taken again"
    assert [m.rcpt_tos for m in backup.messages] == [["r0@four.test"], ["r1@four.test"]]


# -- replies a pipelined group does not expect -----------------------------------------------


class AnswersTheGroup(RawServer):
    """Offers PIPELINING and answers the group up to DATA with `group` in one write; after a 354
    in it, reads the message (recorded in `bodies`) and answers its dot with `dot`. Then 250 to
    any command, 221 to QUIT."""

    def __init__(self, group: bytes, dot: bytes = b"250 2.0.0 queued\r\n") -> None:
        super().__init__()
        self.group = group
        self.dot = dot
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 group ESMTP\r\n")
        try:
            await reader.readline()
            writer.write(b"250-group\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            while (line := await reader.readline()) and not line.startswith(b"DATA"):
                pass
            writer.write(self.group)
            await writer.drain()
            if b"\r\n354 " in b"\r\n" + self.group:
                body = await _read_to_dot(reader)
                if body is None:
                    return
                self.bodies.append(body)
                writer.write(self.dot)
                await writer.drain()
            while line := await reader.readline():
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 2.0.0 noop ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _read_to_dot(reader: asyncio.StreamReader) -> bytes | None:
    """The message up to its final dot, unstuffed; None when the client went before the dot."""
    body = b""
    while data := await reader.readline():
        if data == b".\r\n":
            return body
        body += data[1:] if data.startswith(b".") else data
    return None


def _long(prefix: bytes, size: int) -> bytes:
    return prefix + b"x" * (size - len(prefix) - 2) + b"\r\n"


@pytest.mark.parametrize(
    ("group", "dot"),
    [
        (
            _long(b"250 2.1.0 ", 600)
            + _long(b"250-2.1.5 ", 700)
            + b"250 2.1.5 ok\r\n"
            + _long(b"550 5.1.1 ", 900)
            + b"354 go ahead\r\n",
            _long(b"250 2.0.0 ", 1000),
        ),
        (
            b"250 2.1.0 ok\r\n450-4.2.1 wait\r\n250 2.1.5 ok\r\n250-2.1.5 ok\r\n550 5.1.1 no\r\n354 go\r\n",
            b"451-4.3.0 hmm\r\n250 2.0.0 queued\r\n",
        ),
    ],
    ids=["lines-over-512-octets", "lines-with-mixed-codes"],
)
async def test_long_and_mixed_code_replies_stay_paired_with_their_commands(group: bytes, dot: bytes) -> None:
    async with serving(AnswersTheGroup) as start:
        server = await start(group, dot)
        conn = await connect(server)
        try:
            result = await conn.transact("a@acme.test", ["x@b.test", "y@b.test"], BODY)
            noop = await conn.smtp.noop()
        finally:
            await conn.close()
    taken, refused = result.outcomes
    assert isinstance(taken, Delivered) and taken.reply.code == 250, taken
    assert isinstance(refused, Bounced) and refused.reply.code == 550, refused
    assert (noop.code, noop.message) == (250, "2.0.0 noop ok"), "no reply left over from the group"
    assert server.bodies == [BODY] and not result.broken


async def test_a_reply_with_no_code_in_a_pipelined_group_sends_nothing_and_defers() -> None:
    group = b"250 2.1.0 ok\r\n550 5.1.1 no\r\nHTTP/1.1 400 Bad Request\r\n354 go\r\n"
    async with serving(AnswersTheGroup) as start:
        server = await start(group)
        conn = await connect(server)
        try:
            result = await conn.transact("a@acme.test", ["x@b.test", "y@b.test"], BODY)
        finally:
            await conn.close()
        await asyncio.sleep(0.1)  # whatever was sent before the close has reached the server
    # Once one reply cannot be read, none of the group's can be trusted: all deferred.
    assert [o.kind for o in result.outcomes] == ["deferred", "deferred"], result.outcomes
    assert result.broken and not conn.alive
    assert server.bodies == [], "no message went after the garbage"


# -- a pooled connection dropped while idle --------------------------------------------------


class OneMessageThenDrops(ScriptedMX):
    """Takes one message per connection, then drops the connection: `how` "close" closes it
    (an idle timeout); "silent" keeps it open and answers nothing more (a firewall that lost
    its state), until QUIT, which closes it so that the test ends quickly."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.connections = 0
        self.delivered = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._serve(reader, writer)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        await read_message(reader)
        self.delivered += 1
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        if self.how == "silent":
            while (line := await reader.readline()) and not line.startswith(b"QUIT"):
                pass
        return None


@pytest.mark.parametrize("probe", [False, True], ids=["unprobed", "probed"])
@pytest.mark.parametrize("how", ["close", "silent"])
async def test_a_connection_dropped_while_idle_is_replaced_and_the_message_goes(
    monkeypatch: pytest.MonkeyPatch, how: str, probe: bool
) -> None:
    # Closed: the pool sees it at checkout. Silent: unprobed, its MAIL times out (StaleConnection,
    # nothing was sent); probed, its RSET does. Either way a new connection takes the message.
    monkeypatch.setattr(smtp_session, "REUSE_WITHOUT_PROBE", 0.0 if probe else 3600.0)
    async with serving(OneMessageThenDrops) as start:
        server = await start(how)
        settings = SessionSettings(port=server.port, starttls=False, command_timeout=1.0)
        pool = ConnectionPool(None, settings)  # type: ignore[arg-type]
        resolver = dns.asyncresolver.Resolver(configure=False)  # the MX is an address literal
        try:
            for i in range(3):
                await asyncio.sleep(0.2)  # the idle connection is dropped meanwhile
                result = await attempt(pool, resolver, ["127.0.0.1"], f"r{i}@b.test", "drops")
                (outcome,) = result.outcomes
                assert isinstance(outcome, Delivered), outcome
        finally:
            await pool.close()
    assert server.delivered == 3 and server.connections == 3
