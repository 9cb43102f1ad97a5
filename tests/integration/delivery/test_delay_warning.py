"""Optional delayed-delivery warning: one "delayed" notice to the bounce service after N, retries go on."""

from __future__ import annotations

import nats

from services.core.envelope import BounceNotice
from services.core.topology import bounce_binding
from tests.support.relais import asubmit, message, wait_for_events


async def _notices(stack) -> list[BounceNotice]:
    binding = bounce_binding()  # no bounce service runs here: read what it would receive
    sub = await stack._buses[0].js.pull_subscribe_bind(binding.durable, binding.stream)
    out = []
    try:
        while True:
            try:
                msgs = await sub.fetch(10, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return out
            for msg in msgs:
                out.append(BounceNotice.from_msgpack(msg.data))
                await msg.ack()
    finally:
        await sub.unsubscribe()


async def test_one_delay_warning_after_the_configured_age(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1000
    stack = await make_stack(
        services=("ingress", "router", "delivery"),
        retry={"base_delay": 1.0, "max_delay": 1.0, "delay_warning_after": 1.5},
    )
    assert (await asubmit(stack.smtp_address, recipients=["w@alpha.test"], data=message()))[0] == 250
    await wait_for_events(stack.config.nats.url, "deferred", 4, timeout=40)
    (notice,) = await _notices(stack)
    assert notice.delay_warning and not notice.releases_body and not any(f.expired for f in notice.failures)
    assert [f.recipient for f in notice.failures] == ["w@alpha.test"]
    assert notice.failures[0].reply.code == 451


async def test_no_delay_warning_by_default(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = 1000
    stack = await make_stack(
        services=("ingress", "router", "delivery"), retry={"base_delay": 1.0, "max_delay": 1.0}
    )
    assert (await asubmit(stack.smtp_address, recipients=["w@alpha.test"], data=message()))[0] == 250
    await wait_for_events(stack.config.nats.url, "deferred", 3, timeout=40)
    assert await _notices(stack) == []
