"""Several messages per connection (RSET between), capped by messages_per_connection, connections
and the reuse time limit."""

from __future__ import annotations

import asyncio

import pytest

from services.core.outcome import Delivered
from services.core.runtime import start_bus
from services.delivery import connections
from services.delivery.connections import ConnectionPool
from services.delivery.service import DeliveryService
from services.delivery.shaping import Limits
from services.delivery.smtp_session import SessionSettings, Source
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.conftest import max_in_window, submit_many
from tests.support.relais import wait_for_events

ONE_CONNECTION = """
[site."alpha.test"]
connections = 1
messages_per_connection = 100
"""

TWO_PER_CONNECTION = """
[site."alpha.test"]
connections = 1
messages_per_connection = 2
"""


async def test_messages_share_one_connection(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": shaping_file(ONE_CONNECTION)})
    await submit_many(stack, 6)
    got = await sink.async_wait_for(6)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(f"r{i}@alpha.test" for i in range(6))
    assert sink.connections == 1, "one connection carried every message"
    assert sink.peak_sessions <= 1
    await wait_for_events(stack.config.nats.url, "delivered", 6)


async def test_connection_is_replaced_after_its_message_budget(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": shaping_file(TWO_PER_CONNECTION)})
    await submit_many(stack, 6)
    await sink.async_wait_for(6)
    assert sink.connections == 3, "two messages per connection"
    assert sink.peak_sessions <= 1, "never more than the site's one connection at a time"


async def test_connection_cap_holds_across_two_workers(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    delivery = {"shaping_file": shaping_file(TWO_PER_CONNECTION), "concurrency": 4}
    stack = await make_stack(services=("ingress", "router", "bounce"), delivery=delivery)
    stop = asyncio.Event()
    buses = [await start_bus(stack.config, f"test-delivery-{i}", attempts=3) for i in range(2)]
    workers = [DeliveryService(stack.config, bus) for bus in buses]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        await submit_many(stack, 8)
        got = await sink.async_wait_for(8, timeout=60)
        assert len({r for m in got for r in m.rcpt_tos}) == 8
        assert all(w.attempts > 0 for w in workers), [w.attempts for w in workers]
        assert sink.peak_sessions <= 1, "one connection lease for the site, shared by both workers"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for bus in buses:
            await bus.nc.close()


NEW_CONNECTION_RATE = """
[site."alpha.test"]
messages_per_connection = 1
new_connections_per_minute = 120
"""


async def test_new_connection_rate_is_respected(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": shaping_file(NEW_CONNECTION_RATE)})
    await submit_many(stack, 8)
    got = await sink.async_wait_for(8, timeout=60)
    assert sink.connections == 8, "one message per connection"
    # 120/min: one new connection every 0.5 s, so at most 4 (+1) messages in any 2 s.
    assert max_in_window([m.received_at for m in got], 2.0) <= 5


async def test_transactions_refused_at_mail_count_toward_the_message_budget(
    make_stack, make_sink, shaping_file
) -> None:
    sink = make_sink("127.0.0.2")
    sink.mail_reply = "550 5.7.1 sender blocked here"
    stack = await make_stack(delivery={"shaping_file": shaping_file(TWO_PER_CONNECTION)})
    await submit_many(stack, 6)
    bounced = await wait_for_events(stack.config.nats.url, "bounced", 6)
    assert {e.reply["enhanced"] for e in bounced if e.reply} == {"5.7.1"}
    assert sink.connections == 3, "two transactions per connection, refused or not"


async def test_a_busy_connection_is_replaced_after_the_reuse_time_limit(
    make_sink, sink_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Postfix's smtp_connection_reuse_time_limit (300 s), shortened: with no message budget
    # and never idle long, only the connection's age ends its reuse.
    monkeypatch.setattr(connections, "REUSE_TIME_LIMIT", 1.0, raising=False)
    sink = make_sink("127.0.0.2")
    pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False))  # type: ignore[arg-type]
    unbudgeted = Limits(connections=0, messages_per_connection=0)
    mx = ("mx.alpha.test", "127.0.0.2")
    try:
        for i in range(6):  # one every 0.3 s: the first connection is 1 s old at the fifth
            conn = await pool.checkout(Source(), "alpha.test", *mx, unbudgeted, TlsPolicy())
            done = await conn.transact("a@acme.test", [f"r{i}@alpha.test"], b"Subject: x\r\n\r\nhi\r\n")
            assert isinstance(done.outcomes[0], Delivered), done.outcomes
            await pool.checkin(conn, unbudgeted, reusable=True)
            await asyncio.sleep(0.3)
    finally:
        await pool.close()
    assert len(sink.messages) == 6
    assert sink.connections == 2, "closed at its first check-in past the limit, and replaced"
