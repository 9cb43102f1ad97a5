"""Delivery metrics count what their names say: an attempt is an SMTP attempt, not a handler run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.core import metrics
from services.core.bus import Bus
from services.core.topology import ConsumerBinding, bounce_binding, bounce_subject, webhooks_binding
from services.delivery import pause
from tests.integration.bounce.conftest import wait_accepted, webhook_account
from tests.support.prom import Samples, scrape, value
from tests.support.relais import ACCOUNT, asubmit, message


async def _scraped_until(done: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 20
    while True:
        got = scrape()
        if done(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


async def _counted_by_consumer(bus: Bus, binding: ConsumerBinding, pending: int) -> None:
    # The publish ack comes when the stream stored the message; its consumers learn of it
    # a moment later (nats-server signals them apart from the ack), so a consumer info read
    # right after the ack may still say 0 pending: the gauge would be right, the test not.
    deadline = time.monotonic() + 20
    while (await bus.js.consumer_info(binding.stream, binding.durable)).num_pending < pending:
        assert time.monotonic() < deadline, f"{binding.durable} never counted {pending} pending"
        await asyncio.sleep(0.01)


async def test_a_job_postponed_while_its_pool_is_paused_is_not_an_attempt(make_stack, make_sink) -> None:
    # A paused pool re-schedules each job every pause_recheck; a pinned job is handed back up to
    # 32 times. Counted as attempts, they filled relais_attempt_duration_seconds with ~0 s
    # "attempts" and its rate read as traffic while nothing was sent.
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"pause_recheck": 1.0})
    js = stack._buses[0].js
    await pause.pause(js, "pool", "default", reason="test")
    before = scrape()

    def postponed(data: Samples) -> float:
        return value(data, "relais_delivery_postponed_total", reason="paused") - value(
            before, "relais_delivery_postponed_total", reason="paused"
        )

    await asyncio.sleep(0.5)  # the workers' watch sees the flag
    code, _ = await asubmit(stack.smtp_address, recipients=["p@alpha.test"], data=message())
    assert code == 250
    after = await _scraped_until(lambda d: postponed(d) >= 1)
    assert postponed(after) >= 1
    assert sink.messages == []
    attempts = value(after, "relais_attempt_duration_seconds_count", pool="default") - value(
        before, "relais_attempt_duration_seconds_count", pool="default"
    )
    assert attempts == 0, "a job re-scheduled without contacting an MX is no attempt"

    # Once resumed, the one real attempt is counted, once.
    assert await pause.resume(js, "pool", "default")
    await sink.async_wait_for(1, timeout=30)

    def attempted(data: Samples) -> float:
        return value(data, "relais_attempt_duration_seconds_count", pool="default") - value(
            before, "relais_attempt_duration_seconds_count", pool="default"
        )

    final = await _scraped_until(lambda d: attempted(d) >= 1)
    assert attempted(final) == 1


async def test_webhook_posts_are_counted_like_every_consumer(make_stack, make_sink, receiver) -> None:
    # The webhook loop pulls `webhooks-<account>` itself, not through `bus.consume`: a receiver
    # failing for hours showed in no metric, only in the log.
    receiver.fail_first = 1
    stack = await make_stack(accounts=webhook_account(receiver.url))
    sink = make_sink("127.0.0.2")
    consumer = webhooks_binding(ACCOUNT).durable
    before = scrape()
    code, _ = await asubmit(stack.smtp_address, recipients=["wh@alpha.test"], data=message())
    assert code == 250
    await sink.async_wait_for(1)
    await wait_accepted(receiver, 2)  # the accepted and the delivered event, after one 500

    def processed(data: Samples, result: str) -> float:
        return value(data, "relais_processed_total", consumer=consumer, result=result) - value(
            before, "relais_processed_total", consumer=consumer, result=result
        )

    after = await _scraped_until(lambda d: processed(d, "ack") >= 2)
    assert processed(after, "ack") == 2, "each event acked after its batch got a 2xx"
    assert processed(after, "retry") >= 1, "the events of the batch that got a 500"


async def test_lag_of_a_consumer_that_cannot_be_read_is_not_reported_frozen(topology_bus: Bus) -> None:
    # Read at scrape time: when JetStream cannot say (the consumer gone, NATS away), the last
    # value read stayed, and a lag alert watched a number nobody measured any more.
    binding = bounce_binding()
    await topology_bus.js.publish(bounce_subject(), b"x")
    await _counted_by_consumer(topology_bus, binding, 1)
    await metrics.refresh_queue_gauges(topology_bus.js, [binding])
    assert metrics.REGISTRY.get_sample_value("relais_consumer_pending", {"consumer": binding.durable}) == 1
    await topology_bus.js.delete_consumer(binding.stream, binding.durable)
    await metrics.refresh_queue_gauges(topology_bus.js, [binding])
    for name in ("relais_consumer_pending", "relais_consumer_ack_pending", "relais_consumer_redelivered"):
        assert metrics.REGISTRY.get_sample_value(name, {"consumer": binding.durable}) is None, name
