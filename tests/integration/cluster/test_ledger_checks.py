"""The fault scenarios' own books can fail: each check of the ledger is shown a scenario that
breaks it. A check that cannot fail proves nothing about "no mail lost, one final outcome"."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from services.bounce.dsn import RecipientStatus, build_dsn
from services.core.topology import (
    EVENTS_STREAM,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    ensure_topology,
    event_subject,
    submit_subject,
)
from tests.integration.cluster.ledger import Books, audit, wait_idle
from tests.support.cluster import Cluster, Event, EventLog
from tests.support.nats_delay_proxy import DelayingNatsProxy
from tests.support.smtp_load import Result, Submission
from tests.support.smtp_sink import ReceivedMessage

DELIVERED, BOUNCED = "ok-1@beta.test", "bounce-ok-2@beta.test"


def _sub(tag: str, rcpt: str) -> Submission:
    return Submission(tag, "news@acme.test", (rcpt,), b"Subject: x\r\n\r\nx\r\n")


def _accepted(tag: str, rcpt: str, queue_id: str) -> Result:
    return Result(_sub(tag, rcpt), 250, f"2.0.0 Ok: queued as {queue_id}", 0.0)


@contextlib.asynccontextmanager
async def one_node(tmp_path: Path) -> AsyncIterator[tuple[Cluster, Any]]:
    """A one-node cluster with Relais' topology (no services), and a JetStream context on it."""
    cluster = Cluster(tmp_path, nats_nodes=1)
    try:
        await asyncio.to_thread(cluster.nats.start)
        cluster.config = cluster.build_config()
        nc = await nats.connect(cluster.nats.url)
        try:
            await ensure_topology(nc.jetstream(), cluster.config)
            yield cluster, nc.jetstream()
        finally:
            await nc.close()
    finally:
        cluster.nats.stop()


def _event(kind: str, message_id: str, rcpt: str) -> Event:
    return Event(kind, message_id, (rcpt,), 0.0, {})


def _mail(rcpts: list[str], data: bytes = b"Subject: x\r\n\r\nx\r\n") -> ReceivedMessage:
    return ReceivedMessage(("127.0.0.1", 1), "relais.test", "", rcpts, data, False, 0.0, [])


def _dsn(rcpt: str, action: str = "failed") -> ReceivedMessage:
    status = "5.1.1" if action == "failed" else "4.4.1"
    data = build_dsn(
        reporting_mta="relais.test",
        from_address="MAILER-DAEMON@relais.test",
        to_address="news@acme.test",
        original_headers=b"Subject: x\r\n\r\n",
        recipients=[RecipientStatus(final_recipient=rcpt, action=action, status=status)],
        arrival_date=datetime(2026, 1, 1, tzinfo=UTC),
        message_id="<dsn@relais.test>",
    )
    return _mail(["news@acme.test"], data)


def _books(
    sink: list[ReceivedMessage], sender_mx: list[ReceivedMessage], events: list[Event], **kw: Any
) -> Books:
    results = [_accepted("ok-1", DELIVERED, "m1"), _accepted("ok-2", BOUNCED, "m2")]
    cluster: Any = SimpleNamespace(
        sinks={"beta.test": SimpleNamespace(messages=sink)}, sender_mx=SimpleNamespace(messages=sender_mx)
    )
    return audit(cluster, results, events, **kw)


def _clean() -> tuple[list[ReceivedMessage], list[ReceivedMessage], list[Event]]:
    return (
        [_mail([DELIVERED])],
        [_dsn(BOUNCED)],
        [_event("delivered", "m1", DELIVERED), _event("bounced", "m2", BOUNCED)],
    )


def test_a_clean_run_has_no_problems() -> None:
    sink, sender_mx, events = _clean()
    # A delay warning about a recipient delivered later is no second outcome.
    sender_mx.append(_dsn(DELIVERED, action="delayed"))
    books = _books(sink, sender_mx, events)
    assert books.problems == [], books.summary("clean")
    assert books.counts["final: delivered"] == books.counts["final: bounced"] == 1


def test_a_delivered_recipient_also_reported_failed_is_two_outcomes() -> None:
    sink, sender_mx, events = _clean()
    sender_mx.append(_dsn(DELIVERED))
    assert [p for p in _books(sink, sender_mx, events).problems if DELIVERED in p and "DSN" in p]


def test_a_dsn_sent_twice_counts_against_the_duplicate_window() -> None:
    sink, sender_mx, events = _clean()
    sender_mx.append(_dsn(BOUNCED))
    assert [p for p in _books(sink, sender_mx, events).problems if "1 duplicate DSNs" in p]
    assert _books(sink, sender_mx, events, max_duplicates=1).problems == []


def test_an_outcome_of_another_message_id_is_not_the_accepted_message_s() -> None:
    sink, sender_mx, _ = _clean()
    events = [_event("delivered", "m9", DELIVERED), _event("bounced", "m2", BOUNCED)]
    assert [p for p in _books(sink, sender_mx, events).problems if "'m1'" in p and "m9" in p]


async def test_the_final_event_read_does_not_stop_at_a_quiet_second(tmp_path: Path) -> None:
    """A poll ends at its first second without a message; read_to_end reads up to the sequence
    the stream held when it was called, or fails: never an audit of half the events."""
    async with one_node(tmp_path) as (cluster, js):
        for i in range(5):
            event = f'{{"kind":"delivered","message_id":"m{i}","recipients":["r{i}@x.test"]}}'
            await js.publish(event_subject("acme", "delivered"), event.encode())
        assert len(await EventLog(cluster.nats.urls).read_to_end()) == 5

        # Every event now reaches the reader 1.5 s late, as from a node busy after a restart.
        async with DelayingNatsProxy(cluster.nats.url, EVENTS_STREAM, delay=1.5) as proxy:
            assert await EventLog([proxy.url]).poll() == [], "one poll gives up: what the audit read"
            with pytest.raises(TimeoutError, match="read events up to 0 of 5"):
                await EventLog([proxy.url]).read_to_end(timeout=3.0)


async def test_the_audit_waits_for_work_in_flight(tmp_path: Path) -> None:
    """A job still pending or unacked could yet be delivered a second time: the audit waits for
    none to be left, and reports what is left at its timeout."""
    async with one_node(tmp_path) as (cluster, js):
        assert await wait_idle(cluster, 5.0) == {}
        await js.publish(submit_subject(), b"job")
        assert await wait_idle(cluster, 2.5) == {SUBMIT_CONSUMER: (1, 0)}
        sub = await js.pull_subscribe_bind(SUBMIT_CONSUMER, SUBMIT_STREAM)
        (msg,) = await sub.fetch(1)
        assert await wait_idle(cluster, 2.5) == {SUBMIT_CONSUMER: (0, 1)}
        await msg.ack_sync()
        assert await asyncio.wait_for(wait_idle(cluster, 10.0), 15.0) == {}
