"""One DSN per failed message: the failures of a message's domain jobs that happen within
`bounce.dsn_window` of each other are reported together; a later failure gets a DSN of its own;
delay warnings are never mixed with failures; 0 restores one DSN per job. Events and
suppression do not wait for the window.

Zone (spine conftest): alpha.test -> 127.0.0.2, beta.test -> 127.0.0.3, gamma.test -> 127.0.0.4,
and the sender's own MX (where DSNs land) on 127.0.0.9."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest
from flufl.bounce import all_failures
from nats.js.errors import NoKeysError

from services.bounce.dsn import SUBJECT_DELAYED, SUBJECT_FAILED
from services.bounce.hold import HoldStore
from services.core.topology import (
    BOUNCE_HOLD_BUCKET,
    DELIVER_STREAM,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    delivery_consumer,
)
from tests.integration.bounce.conftest import suppression_entry, wait_consumed
from tests.support.relais import ACCOUNT, RelaisStack, asubmit, message, read_events, wait_for_events
from tests.support.smtp_sink import ReceivedMessage

REJECT = "550 5.1.1 No such user here"
THREE = ["ann@alpha.test", "bob@beta.test", "cat@gamma.test"]
TWO = THREE[:2]


def reported(dsn: ReceivedMessage) -> dict[str, email.message.Message]:
    """Final-Recipient address -> its per-recipient block in the delivery-status part."""
    parsed = email.message_from_bytes(dsn.data)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()[1:]
    return {str(b["Final-Recipient"]).partition(";")[2].strip(): b for b in blocks}


async def held_keys(nats_url: str) -> list[str]:
    """Live keys of the hold bucket: empty once every window has finished."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(BOUNCE_HOLD_BUCKET)
        try:
            return list(await kv.keys())
        except NoKeysError:
            return []
    finally:
        await nc.close()


@pytest.fixture
async def bounce_replica(make_stack: Callable[..., Awaitable[RelaisStack]]) -> AsyncIterator[Any]:
    """Start a second bounce service on a stack's config: notices spread over two replicas."""
    started: list[RelaisStack] = []

    async def start(stack: RelaisStack) -> RelaisStack:
        replica = RelaisStack(stack.config)
        started.append(replica)
        await replica.start(services=("bounce",))
        return replica

    yield start
    for replica in started:
        await replica.stop()


async def test_three_domains_failing_together_get_one_dsn_listing_all_three(
    make_stack, make_sink, sender_mx, bounce_replica
) -> None:
    stack = await make_stack(bounce={"dsn_window": 3.0})
    await bounce_replica(stack)
    url = stack.config.nats.url
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        make_sink(host).rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=THREE, data=message(subject="Three")))[0] == 250

    bounced = await wait_for_events(url, "bounced", 3)
    assert sender_mx.messages == [], "events and suppression do not wait for the DSN window"
    assert {r for e in bounced for r in e.recipients} == set(THREE)
    assert await suppression_entry(url, ACCOUNT, "bob@beta.test") is not None

    (dsn,) = await sender_mx.async_wait_for(1)
    parsed = email.message_from_bytes(dsn.data)
    assert parsed["Subject"] == SUBJECT_FAILED
    temporary, permanent = all_failures(parsed)
    assert permanent == {r.encode() for r in THREE} and not temporary
    blocks = reported(dsn)
    assert set(blocks) == set(THREE)
    assert all(b["Action"] == "failed" and b["Status"] == "5.1.1" for b in blocks.values())
    assert {str(b["Remote-MTA"]) for b in blocks.values()} == {
        "dns; mx.alpha.test",
        "dns; mx.beta.test",
        "dns; mx.gamma.test",
    }
    assert "Subject: Three" in dsn.data.decode()
    assert dsn.mail_from == "<>"

    await asyncio.sleep(4.0)  # longer than the window: no second DSN may follow
    assert len(sender_mx.messages) == 1
    assert await held_keys(url) == []


async def test_window_zero_sends_one_dsn_per_domain_job_at_once(make_stack, make_sink, sender_mx) -> None:
    stack = await make_stack(bounce={"dsn_window": 0})
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        make_sink(host).rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=THREE, data=message()))[0] == 250

    dsns = await sender_mx.async_wait_for(3)
    assert sorted(list(reported(d)) for d in dsns) == [[r] for r in sorted(THREE)]
    await asyncio.sleep(1.5)
    assert len(sender_mx.messages) == 3
    assert await held_keys(stack.config.nats.url) == []


async def test_a_failure_after_the_window_closed_gets_a_dsn_of_its_own(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    alpha, beta = make_sink("127.0.0.2"), make_sink("127.0.0.3")
    alpha.rcpt_default = REJECT
    beta.tempfail_data = 1000  # retried every second or two until the test changes its mind
    assert (await asubmit(stack.smtp_address, recipients=TWO, data=message()))[0] == 250

    (first,) = await sender_mx.async_wait_for(1)
    assert list(reported(first)) == ["ann@alpha.test"]
    beta.rcpt_default = REJECT  # the next retry fails for good, well after the first window
    second = (await sender_mx.async_wait_for(2))[1]
    assert list(reported(second)) == ["bob@beta.test"]
    _, permanent = all_failures(email.message_from_bytes(second.data))
    assert permanent == {b"bob@beta.test"}
    await asyncio.sleep(2.5)
    assert len(sender_mx.messages) == 2
    assert await held_keys(stack.config.nats.url) == []


async def test_delay_warnings_and_failures_of_one_message_are_separate_dsns(
    make_stack, make_sink, sender_mx
) -> None:
    stack = await make_stack(
        bounce={"dsn_window": 3.0},
        retry={"base_delay": 1.0, "max_delay": 1.0, "max_age": 3600.0, "delay_warning_after": 0.5},
    )
    make_sink("127.0.0.2").rcpt_default = REJECT
    make_sink("127.0.0.3").tempfail_data = 1000
    assert (await asubmit(stack.smtp_address, recipients=TWO, data=message()))[0] == 250

    dsns = await sender_mx.async_wait_for(2)
    by_subject = {email.message_from_bytes(d.data)["Subject"]: d for d in dsns}
    assert set(by_subject) == {SUBJECT_FAILED, SUBJECT_DELAYED}
    failed = reported(by_subject[SUBJECT_FAILED])
    delayed = reported(by_subject[SUBJECT_DELAYED])
    assert list(failed) == ["ann@alpha.test"] and failed["ann@alpha.test"]["Action"] == "failed"
    assert list(delayed) == ["bob@beta.test"] and delayed["bob@beta.test"]["Action"] == "delayed"
    await asyncio.sleep(3.0)
    assert len(sender_mx.messages) == 2, "one warning and one failure report, nothing more"


async def test_a_notice_that_dies_before_joining_its_window_is_reported_on_redelivery(
    stack: RelaisStack, make_sink, sender_mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    join = HoldStore.join
    failures = []

    async def dies_once(self: HoldStore, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(args)
            raise RuntimeError("replica killed between holding the notice and joining a window")
        return await join(self, *args, **kwargs)

    monkeypatch.setattr(HoldStore, "join", dies_once)
    make_sink("127.0.0.2").rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=["ann@alpha.test"], data=message()))[0] == 250

    (dsn,) = await sender_mx.async_wait_for(1)  # after the nak's 5 s and the window
    assert failures and list(reported(dsn)) == ["ann@alpha.test"]
    await asyncio.sleep(2.5)
    assert len(sender_mx.messages) == 1
    assert len([e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"]) == 1
    assert await held_keys(stack.config.nats.url) == []


async def test_a_flush_that_dies_after_sending_its_dsn_does_not_send_it_twice(
    stack: RelaisStack, make_sink, sender_mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark_sent, join, close = HoldStore.mark_sent, HoldStore.join, HoldStore.close
    failures = []
    joined: set[str] = set()
    both_joined = asyncio.Event()

    async def dies_once(self: HoldStore, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(args)
            raise RuntimeError("replica killed after publishing the DSN, before recording it")
        return await mark_sent(self, *args, **kwargs)

    async def counts_joins(self: HoldStore, message_id: str, notice: str, *args: Any, **kwargs: Any) -> Any:
        result = await join(self, message_id, notice, *args, **kwargs)
        joined.add(notice)
        if len(joined) == len(TWO):
            both_joined.set()
        return result

    async def closes_once_both_joined(self: HoldStore, *args: Any, **kwargs: Any) -> Any:
        # The window lasts 1-2 s; on a loaded machine one domain job's notice can come later and
        # rightly get a DSN of its own (test_a_failure_after_the_window_closed_...). This test is
        # about the flush, so the window stays open until both joined; should one never join, the
        # flush goes on after 20 s and the DSN's recipients below say so.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await both_joined.wait()
        return await close(self, *args, **kwargs)

    monkeypatch.setattr(HoldStore, "mark_sent", dies_once)
    monkeypatch.setattr(HoldStore, "join", counts_joins)
    monkeypatch.setattr(HoldStore, "close", closes_once_both_joined)
    for host in ("127.0.0.2", "127.0.0.3"):
        make_sink(host).rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=TWO, data=message()))[0] == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    assert set(reported(dsn)) == {"ann@alpha.test", "bob@beta.test"}
    url = stack.config.nats.url
    for _ in range(40):  # the redelivered flush (after the nak's 5 s) finishes the window
        if not await held_keys(url):
            break
        await asyncio.sleep(0.5)
    assert failures
    assert await held_keys(url) == []
    # The redone flush published its DSN before it finished the window. Had that publish not been
    # de-duplicated, the DSN would be in the pipeline now: once the router and delivery have
    # nothing left, the sender's MX has every DSN it will ever get.
    await wait_consumed(url, SUBMIT_STREAM, SUBMIT_CONSUMER)
    await wait_consumed(url, DELIVER_STREAM, delivery_consumer("default"))
    assert len(sender_mx.messages) == 1, "the redone flush's DSN is the same message: de-duplicated"
