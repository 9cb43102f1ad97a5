"""An inbound report is parsed off the event loop: anyone may mail the feedback address a report
of the largest size allowed, whose parse takes half a minute at 50 MB, and the bounce replica's
other consumers, heartbeats and acks must keep moving meanwhile."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.bounce import inbound
from services.core.topology import INBOUND_CONSUMER, INBOUND_STREAM
from tests.integration.bounce.conftest import RETURN_DOMAIN, VERP, publish_inbound, wait_consumed
from tests.support.bounce_samples import postfix_dsn


async def test_the_report_is_parsed_in_a_worker_thread(make_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    parse = inbound.findings

    def recorded(*args: Any) -> inbound.Verdict:
        threads.append(threading.current_thread())
        return parse(*args)

    monkeypatch.setattr(inbound, "findings", recorded)
    stack = await make_stack(services=("bounce",), bounce=VERP)
    to = f"b+nobody.x@{RETURN_DOMAIN}"
    await publish_inbound(stack.config.nats.url, postfix_dsn(to=to, recipient="gone@alpha.test"), [to])
    await wait_consumed(stack.config.nats.url, INBOUND_STREAM, INBOUND_CONSUMER)
    assert threads and threads[0] is not threading.main_thread()


async def test_threads_hanging_in_dns_do_not_hold_reports_up(make_stack) -> None:
    # Webhook POSTs resolve their hosts with getaddrinfo in the loop's default thread pool; a
    # receiver whose DNS hangs holds a thread of it for as long as the lookup.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    hung = threading.Event()
    lookups = [loop.run_in_executor(None, hung.wait) for _ in range(2)]
    try:
        stack = await make_stack(services=("bounce",), bounce=VERP)
        to = f"b+nobody.x@{RETURN_DOMAIN}"
        await publish_inbound(stack.config.nats.url, postfix_dsn(to=to, recipient="gone@alpha.test"), [to])
        await wait_consumed(stack.config.nats.url, INBOUND_STREAM, INBOUND_CONSUMER)
        assert not any(lookup.done() for lookup in lookups), "the pool was taken all along"
    finally:
        hung.set()
        await asyncio.gather(*lookups)
