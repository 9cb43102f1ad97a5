"""A message goes SMTP -> ingress -> JetStream -> router -> delivery -> MX, unchanged."""

from __future__ import annotations

import random

from tests.support.relais import (
    RelaisStack,
    asubmit,
    message,
    stored_bodies,
    strip_received,
    wait_for_events,
)
from tests.support.smtp_sink import SMTPSink


async def test_headers_and_body_arrive_byte_identical(stack: RelaisStack, make_sink) -> None:
    sink: SMTPSink = make_sink("127.0.0.2")
    data = message(subject="Byte for byte", body="Line one\r\n.leading dot\r\n\r\nTabs\tand  spaces \r\n")
    code, reply = await asubmit(stack.smtp_address, recipients=["bob@alpha.test"], data=data)
    assert code == 250, reply
    assert b"queued as" in reply

    (got,) = await sink.async_wait_for(1)
    assert got.mail_from == "news@acme.test"
    assert got.rcpt_tos == ["bob@alpha.test"]
    assert got.data.startswith(b"Received: from client.test")
    assert strip_received(got.data) == data
    delivered = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert delivered[0].recipients == ["bob@alpha.test"]


async def test_one_message_to_three_domains_reaches_each_mx_once(stack: RelaisStack, make_sink) -> None:
    sinks = {
        d: make_sink(ip)
        for d, ip in {"alpha": "127.0.0.2", "beta": "127.0.0.3", "gamma": "127.0.0.4"}.items()
    }
    rcpts = ["a1@alpha.test", "a2@alpha.test", "b1@beta.test", "c1@gamma.test"]
    code, _ = await asubmit(stack.smtp_address, recipients=rcpts, data=message())
    assert code == 250

    assert sorted((await sinks["alpha"].async_wait_for(1))[0].rcpt_tos) == ["a1@alpha.test", "a2@alpha.test"]
    assert (await sinks["beta"].async_wait_for(1))[0].rcpt_tos == ["b1@beta.test"]
    assert (await sinks["gamma"].async_wait_for(1))[0].rcpt_tos == ["c1@gamma.test"]
    await wait_for_events(stack.config.nats.url, "delivered", 3)
    for sink in sinks.values():
        assert len(sink.messages) == 1, "each domain's MX gets the message exactly once"


async def test_ten_megabyte_message_is_delivered_intact(stack: RelaisStack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    rng = random.Random(7)
    lines = "".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(76)) + "\r\n"
        for _ in range(10 * 1024 * 1024 // 78)
    )
    data = message(subject="Big", body=lines)
    assert len(data) > 10 * 1024 * 1024 - 1024
    code, _ = await asubmit(stack.smtp_address, recipients=["big@alpha.test"], data=data)
    assert code == 250
    (got,) = await sink.async_wait_for(1, timeout=60)
    assert strip_received(got.data) == data
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    # Stored once in the Object Store, and removed once every recipient has its final outcome.
    assert await stored_bodies(stack.config.nats.url) == 0
