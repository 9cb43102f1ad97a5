"""A delivery job that comes back after its attempt's outcome was stored (its worker died, or its
ack was lost, between settling and the ack landing) makes no SMTP transaction again; when only
part of the outcome was stored, the recipients without one still get exactly one.

The ack is lost by standing in for the one call that makes it (`bus._confirm_ack`): the job is
nak'ed instead, so JetStream hands it out again at once, as it does after `ack_wait`. A worker
that dies half-way through settling is one whose `delivered` event publish raises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

import services.core.bus as bus_module
import services.core.disposition as disposition
from services.core.envelope import Envelope
from services.core.topology import DELIVER_STREAM, ROUTE_STREAM
from tests.support.relais import asubmit, message, read_events, stored_bodies, wait_for_events

RETRIES = "relais.retry.route.>"


# The MX's refusals: bad@ for good, later@ for now.
BAD = {"bad@alpha.test": "550 5.1.1 <bad@alpha.test>: no such user"}
LATER = {"later@alpha.test": "450 4.2.1 <later@alpha.test>: mailbox busy"}


class LostAcks:
    """The delivery worker's first `count` acks never land: the job is handed out again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 1) -> None:
        self.lost = 0
        self.acked: list[int] = []  # num_delivered of each job whose ack landed
        real = bus_module._confirm_ack

        async def confirm(msg: Msg) -> None:
            if self.lost < count:
                self.lost += 1
                await msg.nak()
                return
            await real(msg)
            self.acked.append(msg.metadata.num_delivered)

        monkeypatch.setattr(bus_module, "_confirm_ack", confirm)

    async def redelivered_and_acked(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not any(n > 1 for n in self.acked):
            assert time.monotonic() < deadline, f"no redelivered job was acked (lost {self.lost})"
            await asyncio.sleep(0.1)


def die_before_the_delivered_event(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The worker dies once, right before its first `delivered` event is stored: everything
    settle published before it stays, the handler fails and the job comes back (in 5 s)."""
    real = disposition.publish_event
    died: list[str] = []

    async def publish_event(bus: Any, event: Any, *, msg_id: str | None = None, **kw: Any) -> None:
        if not died and (msg_id or "").startswith("dlv-"):
            died.append(msg_id or "")
            raise RuntimeError("worker died before its delivered event was stored")
        await real(bus, event, msg_id=msg_id, **kw)

    monkeypatch.setattr(disposition, "publish_event", publish_event)
    return died


def record_rcpts(sink: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every RCPT the sink was asked, refused ones included."""
    asked: list[str] = []
    real = sink.handle_RCPT

    async def handle_RCPT(server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        asked.append(address)
        return await real(server, session, envelope, address, options)

    monkeypatch.setattr(sink, "handle_RCPT", handle_RCPT)
    return asked


async def outcomes_to(url: str, domain: str = "alpha.test") -> dict[str, list[str]]:
    """Every outcome event's recipients at `domain`, by kind (`accepted` and the DSN to the
    sender left out)."""
    found: dict[str, list[str]] = {}
    for event in await read_events(url):
        if event.kind == "accepted":
            continue
        for rcpt in event.recipients:
            if rcpt.endswith(f"@{domain}"):
                found.setdefault(event.kind, []).append(rcpt)
    return {kind: sorted(rcpts) for kind, rcpts in found.items()}


async def with_js(url: str, use: Callable[[Any], Any]) -> Any:
    nc = await nats.connect(url)
    try:
        return await use(nc.jetstream())
    finally:
        await nc.close()


async def pending_retries(url: str) -> dict[str, tuple[str, ...]]:
    """The retry schedules waiting on the route stream: subject -> the job's recipients."""

    async def read(js: Any) -> dict[str, tuple[str, ...]]:
        subjects = (await js.stream_info(ROUTE_STREAM, subjects_filter=RETRIES)).state.subjects or {}
        return {
            s: Envelope.from_msgpack((await js.get_last_msg(ROUTE_STREAM, s)).data).recipients
            for s in subjects
        }

    return await with_js(url, read)


async def queued_jobs(url: str) -> int:
    async def read(js: Any) -> int:
        return (await js.stream_info(DELIVER_STREAM)).state.messages

    return await with_js(url, read)


async def until_acked(url: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Until the delivery stream is empty: the job (redelivered after its worker died) acked."""
    for _ in range(int(timeout / 0.2)):
        if not await queued_jobs(url):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the job was never acked")


@pytest.mark.parametrize("body", ["inline", "stored"])
async def test_a_delivered_job_whose_ack_was_lost_is_not_sent_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    sink = make_sink("127.0.0.2")
    acks = LostAcks(monkeypatch)
    stack = await make_stack(nats={"inline_body_max": 64 if body == "stored" else 128 * 1024})
    url = stack.config.nats.url
    code, _ = await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message(body="x" * 200))
    assert code == 250

    await sink.async_wait_for(1)
    await acks.redelivered_and_acked()
    assert acks.lost == 1
    await asyncio.sleep(0.5)
    assert len(sink.mail_reads) == 1, "one SMTP transaction: the redelivered job found its outcome"
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]]
    assert await outcomes_to(url) == {"delivered": ["r@alpha.test"]}
    assert await queued_jobs(url) == 0
    # The release of the body is settle's last step: the job that found its outcome does it.
    assert await stored_bodies(url) == 0


async def test_a_job_with_every_kind_of_outcome_stored_is_not_tried_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    make_sink("127.0.0.9")  # the sender's MX, for the DSN about bad@
    sink.rcpt_replies = {**BAD, **LATER}
    asked = record_rcpts(sink, monkeypatch)
    acks = LostAcks(monkeypatch)
    stack = await make_stack(retry={"base_delay": 60.0, "max_delay": 60.0})
    url = stack.config.nats.url
    rcpts = ["good@alpha.test", "bad@alpha.test", "later@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    await acks.redelivered_and_acked()
    await wait_for_events(url, "bounced", 1)
    await wait_for_events(url, "deferred", 1)
    assert len(sink.mail_reads) == 1, "one SMTP transaction"
    assert sorted(asked) == sorted(rcpts)
    assert [m.rcpt_tos for m in sink.messages] == [["good@alpha.test"]]
    assert await outcomes_to(url) == {
        "delivered": ["good@alpha.test"],
        "bounced": ["bad@alpha.test"],
        "deferred": ["later@alpha.test"],
    }
    assert list((await pending_retries(url)).values()) == [("later@alpha.test",)]


async def test_a_deferred_job_whose_ack_was_lost_keeps_its_one_retry(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = dict(LATER)
    acks = LostAcks(monkeypatch)
    stack = await make_stack(retry={"base_delay": 60.0, "max_delay": 60.0})
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["later@alpha.test"], data=message()))[0] == 250

    await acks.redelivered_and_acked()
    await wait_for_events(url, "deferred", 1)
    assert len(sink.mail_reads) == 1, "one SMTP transaction"
    assert await outcomes_to(url) == {"deferred": ["later@alpha.test"]}
    assert list((await pending_retries(url)).values()) == [("later@alpha.test",)]


async def test_after_a_stored_bounce_notice_the_retried_recipient_is_not_tried_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    make_sink("127.0.0.9")
    sink.rcpt_replies = {**BAD, **LATER}
    asked = record_rcpts(sink, monkeypatch)
    died = die_before_the_delivered_event(monkeypatch)
    stack = await make_stack(retry={"base_delay": 60.0, "max_delay": 60.0})
    url = stack.config.nats.url
    rcpts = ["good@alpha.test", "bad@alpha.test", "later@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    await sink.async_wait_for(2)  # the first copy, and good@'s again once the job came back
    await until_acked(url)
    await wait_for_events(url, "bounced", 1)
    assert died
    # The retry of later@ and the notice of bad@ were stored, good@'s delivered event was not.
    # Which recipients the notice holds cannot be read back (the bounce service took it), so
    # good@ and bad@ are tried again: good@'s first copy counts as in flight, and bad@'s second
    # refusal is dropped as the stored notice's duplicate. later@ keeps its one retry.
    assert [m.rcpt_tos for m in sink.messages] == [["good@alpha.test"], ["good@alpha.test"]]
    assert asked.count("later@alpha.test") == 1, "later@ has its outcome: the MX is not asked again"
    assert await outcomes_to(url) == {"delivered": ["good@alpha.test"], "bounced": ["bad@alpha.test"]}
    assert list((await pending_retries(url)).values()) == [("later@alpha.test",)]
    assert await queued_jobs(url) == 0


async def test_after_a_stored_retry_the_recipient_without_an_outcome_joins_it(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_replies = dict(LATER)
    died = die_before_the_delivered_event(monkeypatch)
    # The retry comes well after the job does (5 s after its worker died).
    stack = await make_stack(retry={"base_delay": 15.0, "max_delay": 15.0})
    url = stack.config.nats.url
    rcpts = ["good@alpha.test", "later@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message()))[0] == 250

    await sink.async_wait_for(1)
    await until_acked(url)
    assert died
    assert len(sink.mail_reads) == 1, "no second SMTP transaction when the job came back"
    # later@'s retry was stored, good@'s delivered event was not: good@ joins later@'s retry,
    # which stays the only one, and gets its one outcome there.
    assert [sorted(r) for r in (await pending_retries(url)).values()] == [rcpts]
    assert await outcomes_to(url) == {}

    sink.rcpt_replies.clear()
    await sink.async_wait_for(2, timeout=40.0)
    await wait_for_events(url, "delivered", 1)
    await asyncio.sleep(0.5)
    # good@'s first copy had no stored outcome: like a copy whose reply never came, it is in
    # flight, and the retry sends it again.
    assert [sorted(m.rcpt_tos) for m in sink.messages] == [["good@alpha.test"], sorted(rcpts)]
    assert await outcomes_to(url) == {"delivered": sorted(rcpts)}
    assert await pending_retries(url) == {}


async def test_a_job_whose_worker_died_before_storing_anything_is_sent_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    died = die_before_the_delivered_event(monkeypatch)
    stack = await make_stack()
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    # Nothing of the attempt was stored: the copy the MX took is in flight, and the mail must
    # not be lost on the chance that it arrived.
    await sink.async_wait_for(2)
    await wait_for_events(url, "delivered", 1)
    await asyncio.sleep(0.5)
    assert died
    assert len(sink.messages) == 2
    assert await outcomes_to(url) == {"delivered": ["r@alpha.test"]}


def die_after_the_retry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The worker dies once, right after its first attempt's retry schedule was stored: its
    `deferred` event is never published, the handler fails and the job comes back in 5 s."""
    real = disposition._report_deferred
    died: list[str] = []

    async def report_deferred(bus: Any, event: Any, env: Envelope) -> None:
        if not died:
            died.append(env.key)
            raise RuntimeError("worker died before its deferred event was published")
        await real(bus, event, env)

    monkeypatch.setattr(disposition, "_report_deferred", report_deferred)
    return died


async def test_a_deferred_job_whose_retry_fired_before_it_came_back_is_not_sent_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1  # the first attempt is deferred, every later one delivered
    died = die_after_the_retry(monkeypatch)
    # The retry fires (in 1-2 s) before the job comes back (5 s after its worker died), as
    # by default it fires (60 s) before a killed worker's job is handed out again (ack_wait).
    stack = await make_stack(retry={"base_delay": 1.0, "max_delay": 1.0, "jitter": 0.0})
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    await sink.async_wait_for(1)  # the retry's copy
    await wait_for_events(url, "delivered", 1)
    await until_acked(url)  # and the job that came back after the retry fired
    await asyncio.sleep(0.5)
    assert died
    assert await pending_retries(url) == {}
    # The fired retry took the job on: the job that came back finds its attempt settled (every
    # recipient deferred, its retry stored) and sends nothing, or r@ gets two copies and two
    # final outcomes.
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]]
    assert await outcomes_to(url) == {"delivered": ["r@alpha.test"]}


async def test_a_partly_settled_attempt_made_again_keeps_the_body_its_stored_retry_needs(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    make_sink("127.0.0.9")  # the sender's MX, for the DSN about bad@
    sink.rcpt_replies = {**BAD, **LATER}
    died = die_before_the_delivered_event(monkeypatch)
    # A stored body; the retry comes well after the job does (5 s after its worker died).
    stack = await make_stack(
        nats={"inline_body_max": 64}, retry={"base_delay": 15.0, "max_delay": 15.0, "jitter": 0.0}
    )
    url = stack.config.nats.url
    rcpts = ["good@alpha.test", "bad@alpha.test", "later@alpha.test"]
    data = message(body="x" * 200)
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=data))[0] == 250

    await sink.async_wait_for(1)
    del sink.rcpt_replies["bad@alpha.test"]  # bad@ takes the mail when the job comes back
    await sink.async_wait_for(2)
    await until_acked(url)
    assert died
    # The retry of later@ and the notice of bad@ were stored, good@'s delivered event was not:
    # good@ and bad@ were sent again, and took it. later@'s retry still waits, with the body.
    assert [sorted(m.rcpt_tos) for m in sink.messages] == [
        ["good@alpha.test"],
        ["bad@alpha.test", "good@alpha.test"],
    ]
    assert list((await pending_retries(url)).values()) == [("later@alpha.test",)]
    assert await stored_bodies(url) == 1, "later@'s retry needs the body"

    sink.rcpt_replies.clear()
    await sink.async_wait_for(3, timeout=40.0)
    assert [m.rcpt_tos for m in sink.messages][2] == ["later@alpha.test"]
    assert (await outcomes_to(url)).get("delivered", []).count("later@alpha.test") == 1
    assert await stored_bodies(url) == 0, "released by later@'s final outcome"


async def test_after_a_stored_bounce_notice_a_stored_body_stays_for_the_recipients_sent_again(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = make_sink("127.0.0.2")
    sender_mx = make_sink("127.0.0.9")  # the DSN about bad@
    sink.rcpt_replies = dict(BAD)
    died = die_before_the_delivered_event(monkeypatch)
    # A stored body, and the DSN at once: the notice is handled before the job comes back.
    stack = await make_stack(nats={"inline_body_max": 64}, bounce={"dsn_window": 0.0})
    url = stack.config.nats.url
    rcpts = ["good@alpha.test", "bad@alpha.test"]
    assert (await asubmit(stack.smtp_address, recipients=rcpts, data=message(body="x" * 200)))[0] == 250

    await sender_mx.async_wait_for(1)
    await sink.async_wait_for(2, timeout=15.0)  # good@ again once the job came back
    await until_acked(url)
    assert died
    # As with an inline body: the notice of bad@ was stored, good@'s delivered event was not, so
    # good@ is sent again and gets its one outcome; bad@'s second refusal is the notice's
    # duplicate. The notice's DSN did not take the body good@ still needed.
    assert [m.rcpt_tos for m in sink.messages] == [["good@alpha.test"], ["good@alpha.test"]]
    assert await outcomes_to(url) == {"delivered": ["good@alpha.test"], "bounced": ["bad@alpha.test"]}
    assert len(sender_mx.messages) == 1, "one DSN"
    assert await stored_bodies(url) == 0
