"""A job of a multi-domain message that keeps failing must not have its finished siblings routed
again: past the duplicate window, a sibling routed again is a second delivery job, so its
recipients get the mail twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.js import JetStreamContext

from services.core import bus
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import (
    DELIVER_STREAM,
    ROUTE_STREAM,
    ROUTER_CONSUMER,
    deliver_subject,
    route_subject,
    verdict_subject,
)
from tests.support.prom import scrape, value
from tests.support.relais import ACCOUNT, an_envelope, wait_for_events


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def _stored(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


def _router_errors() -> float:
    return value(scrape(), "relais_processed_total", consumer=ROUTER_CONSUMER, result="error")


async def test_a_failing_job_does_not_route_its_finished_sibling_again(
    make_stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The verdict's publish fails on its first "no responders" rather than after the 30 s a
    # leader election may take: the same failure, half a minute sooner.
    monkeypatch.setattr(bus, "ACK_PATIENCE", 0.0)
    stack = await make_stack(services=("router",))
    url = stack.config.nats.url
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # The duplicate window passing while a job keeps failing, made short.
        deliver = (await js.stream_info(DELIVER_STREAM)).config
        deliver.duplicate_window = 1.0
        # beta.test's only recipient is suppressed: its job's fate is a verdict, which fails
        # while the delivery stream takes no verdicts.
        declared = list(deliver.subjects or [])
        deliver.subjects = [s for s in declared if s != verdict_subject()]
        await js.update_stream(deliver)
        await SuppressionList(js).add(Suppression(account=ACCOUNT, address="b@beta.test", reason="manual"))
        errors_before = _router_errors()

        await js.publish(route_subject(), an_envelope("a@alpha.test", "b@beta.test").to_msgpack())
        await _until(lambda: _stored_at_least(js, DELIVER_STREAM, 1), "the alpha.test job was never stored")
        await _until(_errored(errors_before), "the beta.test job never failed")
        await asyncio.sleep(1.5)  # the alpha.test job's msg id is forgotten

        deliver.subjects = declared
        await js.update_stream(deliver)
        await wait_for_events(url, "suppressed", 1)
        await _until(lambda: _router_idle(js), "the router never finished the message")

        jobs = await js.stream_info(DELIVER_STREAM, subjects_filter=deliver_subject("default"))
        assert jobs.state.messages == 1, "the alpha.test recipient got two delivery jobs"
    finally:
        await nc.close()


async def _stored_at_least(js: JetStreamContext, stream: str, count: int) -> bool:
    return await _stored(js, stream) >= count


def _errored(before: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _router_errors() > before

    return check


async def _router_idle(js: JetStreamContext) -> bool:
    info = await js.consumer_info(ROUTE_STREAM, ROUTER_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0
