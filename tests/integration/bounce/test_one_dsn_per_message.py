"""One DSN per failed message: the failures of a message's domain jobs that happen within
`bounce.dsn_window` of each other are reported together; a later failure gets a DSN of its own;
delay warnings are never mixed with failures; 0 restores one DSN per job. Events and
suppression do not wait for the window.

A test about what one window reports holds it open until its notices joined
(`hold_dsn_windows`), and "no other DSN follows" is checked once the pipeline settled
(`wait_settled`), not after a sleep: both hold on a loaded machine as on an idle one.

Zone (spine conftest): alpha.test -> 127.0.0.2, beta.test -> 127.0.0.3, gamma.test -> 127.0.0.4,
and the sender's own MX (where DSNs land) on 127.0.0.9."""

from __future__ import annotations

import email
import email.message
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from flufl.bounce import all_failures

from services.bounce.dsn import SUBJECT_DELAYED, SUBJECT_FAILED
from services.bounce.hold import HoldStore
from tests.integration.bounce.conftest import held_keys, hold_dsn_windows, suppression_entry, wait_settled
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
    make_stack, make_sink, sender_mx, bounce_replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Open until the test has seen the events too: they must come while the window is open.
    window = hold_dsn_windows(monkeypatch, len(THREE), until_released=True)
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
    window.release()

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

    await wait_settled(url)
    assert len(sender_mx.messages) == 1, "no second DSN follows"
    assert await held_keys(url) == []


async def test_window_zero_sends_one_dsn_per_domain_job_at_once(make_stack, make_sink, sender_mx) -> None:
    stack = await make_stack(bounce={"dsn_window": 0})
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        make_sink(host).rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=THREE, data=message()))[0] == 250

    dsns = await sender_mx.async_wait_for(3)
    assert sorted(list(reported(d)) for d in dsns) == [[r] for r in sorted(THREE)]
    await wait_settled(stack.config.nats.url)
    assert len(sender_mx.messages) == 3
    assert await held_keys(stack.config.nats.url) == []


async def test_a_failure_after_the_window_closed_gets_a_dsn_of_its_own(
    stack: RelaisStack, make_sink, sender_mx
) -> None:
    # No window is held here: the test is about a notice that comes after its window closed.
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
    await wait_settled(stack.config.nats.url)
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
    # bob's job is retried every second: two more of its deferrals, then their notices (if any),
    # windows and DSNs are through.
    url = stack.config.nats.url
    deferred = len(await wait_for_events(url, "deferred", 1))
    await wait_for_events(url, "deferred", deferred + 2)
    await wait_settled(url, retries=False)
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
    await wait_settled(stack.config.nats.url)
    assert len(sender_mx.messages) == 1
    assert len([e for e in await read_events(stack.config.nats.url) if e.kind == "bounced"]) == 1
    assert await held_keys(stack.config.nats.url) == []


async def test_a_flush_that_dies_after_sending_its_dsn_does_not_send_it_twice(
    stack: RelaisStack, make_sink, sender_mx, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark_sent = HoldStore.mark_sent
    failures = []

    async def dies_once(self: HoldStore, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(args)
            raise RuntimeError("replica killed after publishing the DSN, before recording it")
        return await mark_sent(self, *args, **kwargs)

    monkeypatch.setattr(HoldStore, "mark_sent", dies_once)
    hold_dsn_windows(monkeypatch, len(TWO))  # the test is about the flush, not the window's length
    for host in ("127.0.0.2", "127.0.0.3"):
        make_sink(host).rcpt_default = REJECT
    assert (await asubmit(stack.smtp_address, recipients=TWO, data=message()))[0] == 250

    (dsn,) = await sender_mx.async_wait_for(1)
    assert set(reported(dsn)) == {"ann@alpha.test", "bob@beta.test"}
    url = stack.config.nats.url
    # The redelivered flush (after the nak's 5 s) publishes the DSN again and finishes the
    # window; settled, the sender's MX has every DSN it will ever get.
    await wait_settled(url)
    assert failures
    assert await held_keys(url) == []
    assert len(sender_mx.messages) == 1, "the redone flush's DSN is the same message: de-duplicated"
