"""A provider's 421 throttling text puts (source, site) into back-off: the rate drops, nothing is lost."""

from __future__ import annotations

import msgpack

from services.core.topology import DELIVERY_CONTROL_BUCKET
from services.delivery.control import Backoff, backoff_key
from tests.integration.delivery.conftest import SOURCE_A, max_in_window, submit_many
from tests.support.relais import wait_for_events

RULES = """
[[pushback]]
name = "test-slow-down"
match = "slow down"
duration = "5m"
messages_per_minute = 30
"""
THROTTLE = "421 4.7.0 Too much mail from your IP, slow down"


async def test_throttle_reply_backs_off_the_source_for_the_site(make_stack, make_sink, shaping_file) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1
    sink.tempfail_reply = THROTTLE
    stack = await make_stack(delivery={"shaping_file": shaping_file(RULES)})

    await submit_many(stack, 1, "first@alpha.test")
    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.reply["code"] == 421 and "slow down" in deferred.reply["text"]

    kv = await stack._buses[0].js.key_value(DELIVERY_CONTROL_BUCKET)
    entry = await kv.get(backoff_key(SOURCE_A, "alpha.test"))
    state = Backoff.from_bytes(entry.value)
    assert state.rule == "test-slow-down" and state.messages_per_minute == 30
    assert msgpack.unpackb(entry.value)[0] > deferred.at + 200, "backed off for the rule's duration"

    await submit_many(stack, 4)
    got = await sink.async_wait_for(5, timeout=60)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
        ["first@alpha.test", *(f"r{i}@alpha.test" for i in range(4))]
    )
    # 30/min is one message per 2 s: at most 2 in any 3 s (+1 tolerance), where unshaped
    # delivery would land all of them within a second or two.
    assert max_in_window([m.received_at for m in got], 3.0) <= 3
