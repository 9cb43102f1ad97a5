"""Greylisting is no push-back: the built-in rules leave a site's rate alone when its MX answers
a new (sender, recipient) pair with "451 4.7.1 Try again later", as rspamd and milter-greylist
do. Such a site greylists every new recipient, so a push-back would be renewed at each one and
hold the whole site at the slow rate for as long as the send lasts."""

from __future__ import annotations

import pytest
from nats.js.errors import KeyNotFoundError

from services.core.topology import DELIVERY_CONTROL_BUCKET
from services.delivery.control import backoff_key
from tests.integration.delivery.conftest import SOURCE_A, submit_many
from tests.support.relais import wait_for_events

GREYLISTED = "451 4.7.1 Try again later"


async def test_a_greylisting_reply_backs_nothing_off(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.rcpt_default = GREYLISTED
    stack = await make_stack(retry={"base_delay": 1.0, "max_delay": 2.0})
    await submit_many(stack, 1)
    (deferred,) = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert deferred.reply["enhanced"] == "4.7.1"

    kv = await stack._buses[0].js.key_value(DELIVERY_CONTROL_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await kv.get(backoff_key(SOURCE_A, "alpha.test"))

    sink.rcpt_default = None
    (got,) = await sink.async_wait_for(1, timeout=60)
    assert got.rcpt_tos == ["r0@alpha.test"]
