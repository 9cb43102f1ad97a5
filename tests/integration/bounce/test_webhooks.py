"""Event webhooks against a real HTTP receiver on loopback: signed JSON batches, and a receiver
that fails three times still gets every event exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.bounce.webhooks import post
from services.core.config import AccountConfig
from services.core.topology import event_subject
from tests.integration.bounce.conftest import WEBHOOK_SECRET, wait_accepted, wait_settled, webhook_account
from tests.support.relais import (
    ACCOUNT,
    asubmit,
    message,
    password_hash,
    read_events,
    wait_for_events,
)


async def test_receiver_failing_three_times_gets_every_event_once(
    make_stack, make_sink, sender_mx, receiver
) -> None:
    receiver.fail_first = 3
    stack = await make_stack(
        accounts=webhook_account(receiver.url),
        bounce={"webhook_retry_base": 0.2, "webhook_retry_max": 1.0},
    )
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = {"gone@alpha.test": "550 5.1.1 User unknown"}
    for rcpt in ("a@alpha.test", "b@alpha.test", "gone@alpha.test"):
        assert (await asubmit(stack.smtp_address, recipients=[rcpt], data=message()))[0] == 250
    await sink.async_wait_for(2)

    # 3 accepted + 2 delivered + 1 bounced + the DSN's own events, at least.
    await wait_accepted(receiver, 6)
    # The DSN leaves a DSN window after the bounce: its events come last, so wait for them
    # before deciding that the receiver has caught up with the stream.
    await sender_mx.async_wait_for(1)
    await wait_for_events(stack.config.nats.url, "delivered", 3)
    # Until every event is out and the webhook has settled each: a POST that failed, or one
    # whose 2xx went unseen, would have its events nak'ed and waiting, posted again before this
    # returns; a duplicate is at the receiver by then, not after a sleep one hopes long enough.
    await wait_settled(stack.config.nats.url, webhooks=[ACCOUNT])
    events = await read_events(stack.config.nats.url, ACCOUNT)
    want = sorted((e.kind, r) for e in events for r in e.recipients)
    with receiver.lock:
        accepted = list(receiver.accepted)
        requests, bad = receiver.requests, receiver.bad_signatures
    assert requests >= 4 and bad == 0
    ids = [e["event_id"] for e in accepted]
    assert len(ids) == len(set(ids)), "no event delivered twice"
    assert sorted((e["event"], e["email"]) for e in accepted) == want, "every event of the account, once"
    bounce = next(e for e in accepted if e["event"] == "bounced")
    assert bounce["email"] == "gone@alpha.test" and bounce["category"] == "invalid_recipient"
    assert bounce["response"].startswith("550 5.1.1")
    assert all(e["account"] == ACCOUNT and isinstance(e["timestamp"], int) for e in accepted)


async def test_a_hung_receiver_holds_back_neither_mail_nor_other_accounts(
    make_stack, make_sink, receiver
) -> None:
    release = threading.Event()

    class Hang(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(30)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hung = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    thread = threading.Thread(target=hung.serve_forever, daemon=True)
    thread.start()
    try:
        accounts = webhook_account(f"http://127.0.0.1:{hung.server_address[1]}/hook")
        accounts["other"] = AccountConfig(
            password_hash=password_hash(),
            domains=["other.test"],
            webhook_url=receiver.url,
            webhook_secret=WEBHOOK_SECRET,
        )
        stack = await make_stack(
            accounts=accounts, bounce={"webhook_timeout": 3.0, "webhook_retry_base": 0.5}
        )
        sink = make_sink("127.0.0.2")
        for i in range(3):
            code, _ = await asubmit(stack.smtp_address, recipients=[f"a{i}@alpha.test"], data=message())
            assert code == 250
            code, _ = await asubmit(
                stack.smtp_address,
                user="other",
                sender="news@other.test",
                recipients=[f"o{i}@alpha.test"],
                data=message(sender="news@other.test"),
            )
            assert code == 250
        # While the first account's receiver hangs: all mail goes out, the other account's
        # webhook gets all of its events (3 accepted + 3 delivered).
        await sink.async_wait_for(6)
        await wait_accepted(receiver, 6)
        assert not release.is_set()
        with receiver.lock:
            assert {e["account"] for e in receiver.accepted} == {"other"}
    finally:
        release.set()
        hung.shutdown()
        hung.server_close()
        thread.join(5)


async def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout(make_stack, make_sink) -> None:
    # One byte every 0.8 s: each read comes in time, but the answer would take about a minute.
    # `webhook_timeout` bounds the whole POST, so the batch is retried instead of held.
    connections = 0
    third = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections >= 3:
            third.set()
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: " + b"x" * 40 + b"\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.8)
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        stack = await make_stack(
            accounts=webhook_account(f"http://127.0.0.1:{port}/hook"),
            bounce={"webhook_timeout": 1.0, "webhook_retry_base": 0.2, "webhook_retry_max": 0.5},
        )
        make_sink("127.0.0.2")
        assert (await asubmit(stack.smtp_address, recipients=["t@alpha.test"], data=message()))[0] == 250
        # Each attempt ends at the timeout and is tried again after the back-off.
        await asyncio.wait_for(third.wait(), 30)
    finally:
        server.close()


async def test_an_interim_answer_is_read_past_and_no_answer_is_an_error() -> None:
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nServer: t\r\n\r\n",
        b"",  # closes without answering
    ]

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
        async with asyncio.timeout(10):
            assert await post(url, b"[]", {"Content-Type": "application/json"}) == 204
            with pytest.raises(ValueError, match="not an HTTP response"):
                await post(url, b"[]", {})
    finally:
        server.close()


async def test_a_malformed_event_is_dropped_and_the_webhook_goes_on(make_stack, make_sink, receiver) -> None:
    # A JSON array, a field of the wrong type: neither may end the posting loop (and with it the
    # bounce service), nor come back for ever.
    stack = await make_stack(
        accounts=webhook_account(receiver.url), bounce={"webhook_retry_base": 0.2, "webhook_retry_max": 0.5}
    )
    make_sink("127.0.0.2")
    bus = stack._buses[0]
    await bus.js.publish(event_subject(ACCOUNT, "delivered"), b"[]")
    broken = {"kind": "delivered", "message_id": "m", "account": ACCOUNT, "recipients": ["x@y.test"]}
    await bus.js.publish(event_subject(ACCOUNT, "delivered"), json.dumps({**broken, "detail": None}).encode())
    assert (await asubmit(stack.smtp_address, recipients=["ok@alpha.test"], data=message()))[0] == 250
    await wait_accepted(receiver, 2)  # the message's accepted and delivered events
    with receiver.lock:
        assert {e["email"] for e in receiver.accepted} == {"ok@alpha.test"}
