"""`relais status` during a pause, against real services: the mail a pause holds is counted apart
from the mail waiting for delivery and from the mail a remote MX deferred. Delivery re-schedules a
paused pool's jobs (`relais.retry.deliver.*`) as it schedules a deferred job's retry, so both were
counted as DEFERRED, and the queue of a paused pool not yet picked up as QUEUED: an operator read
a site as deferring mail that was only behind the pause."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
from nats.js.errors import NotFoundError

from services.core.topology import DELIVER_STREAM, deliver_filter, retry_filters
from tests.support.relais import asubmit, message, relais_cli, wait_for_events, wait_for_stored
from tests.support.smtp_sink import SMTPSink

HOUR = 3600.0


def section(out: str, title: str) -> list[list[str]]:
    """The rows of one per-site table of `relais status`, split into words."""
    blocks = [b for b in out.split("\n\n") if b.startswith(title)]
    assert len(blocks) == 1, f"no {title} table:\n{out}"
    return [line.split() for line in blocks[0].splitlines()[1:]]


async def test_status_counts_mail_held_by_a_pause_apart_from_deferred_mail(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink]
) -> None:
    stack = await make_stack(retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 24 * HOUR})
    url = stack.config.nats.url
    make_sink("127.0.0.2").tempfail_data = 1  # alpha.test defers: its retry is an hour away
    beta = make_sink("127.0.0.3")
    code, _ = await asubmit(stack.smtp_address, recipients=["a@alpha.test"], data=message())
    assert code == 250
    await wait_for_events(url, "deferred", 1)

    rc, out = await relais_cli("pause", "pool", "default", "--reason", "incident 9", nats_url=url)
    assert rc == 0, out
    await asyncio.sleep(0.5)  # the delivery worker's watch sees it
    code, _ = await asubmit(stack.smtp_address, recipients=["b1@beta.test", "b2@beta.test"], data=message())
    assert code == 250
    await _postponed(url)

    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0, out
    assert section(out, "HELD RECIPIENTS BY SITE") == [["beta.test", "2"]], out
    assert section(out, "DEFERRED RECIPIENTS BY SITE") == [["alpha.test", "1"]], out
    assert "QUEUED: none" in out, out
    assert beta.messages == []

    rc, out = await relais_cli("resume", "pool", "default", nats_url=url)
    assert rc == 0, out
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert "HELD: none" in out, "nothing is held once the pause is gone"


async def test_status_counts_a_paused_pools_queue_as_held(make_stack: Callable[..., Any]) -> None:
    # No delivery service: the routed jobs wait in the delivery stream, behind the pause.
    stack = await make_stack(services=("ingress", "router"))
    url = stack.config.nats.url
    rc, out = await relais_cli("pause", "site", "beta.test", nats_url=url)
    assert rc == 0, out
    for recipients in (["a@alpha.test"], ["b@beta.test", "c@beta.test"]):
        code, _ = await asubmit(stack.smtp_address, recipients=recipients, data=message())
        assert code == 250
    await wait_for_stored(url, DELIVER_STREAM, 2)
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0, out
    assert section(out, "QUEUED RECIPIENTS BY SITE") == [["alpha.test", "1"]], out
    assert section(out, "HELD RECIPIENTS BY SITE") == [["beta.test", "2"]], out


async def _postponed(url: str, within: float = 20.0) -> None:
    """Until delivery has re-scheduled a job (a schedule on relais.retry.deliver.*) and no job
    waits in the pool's queue."""
    postponements = dict(retry_filters())[DELIVER_STREAM]
    client = await nats.connect(url)
    js = client.jetstream()
    try:
        for _ in range(int(within / 0.1)):
            try:
                await js.get_msg(DELIVER_STREAM, seq=1, subject=postponements, next=True)
            except NotFoundError:
                await asyncio.sleep(0.1)
                continue
            try:
                await js.get_msg(DELIVER_STREAM, seq=1, subject=deliver_filter(), next=True)
            except NotFoundError:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the job was not postponed")
    finally:
        await client.close()
