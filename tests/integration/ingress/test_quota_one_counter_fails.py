"""A message refused because one of its account's two rate counters (per UTC hour, per UTC day)
could not be counted costs the sender nothing: the other counter's increment is given back.

Before, the hour's increment stayed while the message was answered 451 4.3.0, so a client
retrying through such an error (as it should after a 4xx) used up its hourly quota with
messages that were never queued, and was then refused for the limit once the broker healed.

The fault is real: the limits stream stops covering the day counters' subjects, so JetStream
answers their increments with "no responders" while the hour counters' still succeed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from services.core.config import AccountConfig
from services.core.outcome import QUEUE_UNAVAILABLE
from services.core.topology import LIMIT_KINDS, LIMITS_STREAM, PREFIX
from tests.integration.ingress.helpers import in_thread, queued, send_counted
from tests.support.relais import ACCOUNT, password_hash


@pytest.fixture
async def js(make_ingress: Callable[..., Any]) -> AsyncIterator[tuple[Any, JetStreamContext]]:
    """An ingress whose account may send two messages an hour, and a JetStream client of its own."""
    account = AccountConfig(
        password_hash=password_hash(),
        domains=["acme.test"],
        max_messages_per_hour=2,
        max_messages_per_day=100,
    )
    stack = await make_ingress(accounts={ACCOUNT: account})
    nc = await nats.connect(stack.config.nats.url)
    try:
        yield stack, nc.jetstream()
    finally:
        await nc.close()


async def _limits_cover(js: JetStreamContext, kinds: tuple[str, ...]) -> None:
    info = await js.stream_info(LIMITS_STREAM)
    info.config.subjects = [f"{PREFIX}.limits.{kind}.>" for kind in kinds]
    await js.update_stream(info.config)


async def test_retries_through_a_failing_day_counter_leave_the_hourly_quota_whole(
    js: tuple[Any, JetStreamContext],
) -> None:
    stack, client = js
    await _limits_cover(client, tuple(kind for kind in LIMIT_KINDS if kind != "msg-day"))
    during = [await in_thread(send_counted, stack.smtp_address) for _ in range(3)]
    await _limits_cover(client, LIMIT_KINDS)
    after = [await in_thread(send_counted, stack.smtp_address) for _ in range(2)]

    unavailable = (
        QUEUE_UNAVAILABLE.code,
        f"{QUEUE_UNAVAILABLE.enhanced_status} {QUEUE_UNAVAILABLE.text}".encode(),
    )
    assert during == [unavailable] * 3
    # The hour allows two messages, and none of the three refused ones was counted.
    assert [code for code, _ in after] == [250, 250], after
    assert len(await queued(stack.config.nats.url)) == 2
