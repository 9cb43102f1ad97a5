"""A job that warm-up counted against one UTC day is not sent from its warming IP on a later day
(delivery's shaping can hold a pinned job for hours, past midnight): on top of the next day's
own count, the IP would send up to twice its cap that day. Delivery defers it instead, and its
retry is routed, and counted, again for the day it goes out."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

from nats.js.errors import KeyNotFoundError

from services.core.config import PoolConfig, SourceConfig, WarmupConfig
from services.core.envelope import META_SOURCE, META_WARMUP_DAY, job_key, new_message_id
from services.core.topology import WARMUP_BUCKET, deliver_subject
from services.router.warmup import OTHER_SCOPE, counter_key, utc_day
from tests.integration.router.conftest import account
from tests.support.relais import an_envelope, wait_for_events

WARMING = "127.0.0.13"
DAY_OVER = "4.4.5"


def _pinned_job(recipient: str, day: str):
    return an_envelope(
        recipient,
        id=(message_id := new_message_id()),
        job_id=job_key(message_id, 0),
        pool="warming",
        domain="alpha.test",
        site="alpha.test",
        mx_hosts=("mx.alpha.test",),
        meta={META_SOURCE: WARMING, META_WARMUP_DAY: day},
    )


async def test_a_job_counted_for_a_day_that_is_over_is_counted_again_before_it_goes(
    make_stack, make_sink
) -> None:
    start = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    stack = await make_stack(
        pools={
            "default": PoolConfig(),
            "warming": PoolConfig(
                sources=[SourceConfig(address=WARMING, warmup="new-ip", warmup_start=start)]
            ),
        },
        warmup={"new-ip": WarmupConfig(daily=[3] * 10, overflow="defer")},
        accounts=account("warming"),
    )
    sink = make_sink("127.0.0.2")
    today = utc_day(time.time())
    bus = stack._buses[0]
    held = _pinned_job("held@alpha.test", (today - timedelta(days=1)).isoformat())
    fresh = _pinned_job("fresh@alpha.test", today.isoformat())
    for job in (held, fresh):
        await bus.publish(deliver_subject("warming"), job.to_msgpack(), msg_id=f"{job.job_id}.0")

    delivered = await wait_for_events(stack.config.nats.url, "delivered", 2)
    by_job = {e.job_id: e for e in delivered}
    assert by_job[fresh.job_id].attempt == 1, "a job counted for today goes at once"
    assert by_job[held.job_id].attempt == 2, "the held job went on its retry, routed again"
    assert {m.peer[0] for m in sink.messages} == {WARMING}
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 1)
    assert [e.job_id for e in deferred] == [held.job_id], "only the job counted for yesterday waited"
    assert deferred[0].reply is not None and deferred[0].reply["enhanced"] == DAY_OVER

    kv = await bus.js.key_value(WARMUP_BUCKET)
    total = 0
    for day in {today, utc_day(time.time())}:  # the retry may have been routed after midnight
        with contextlib.suppress(KeyNotFoundError):
            total += int((await kv.get(counter_key(day, WARMING, OTHER_SCOPE))).value or b"0")
    assert total == 1, "the held job's retry counted for the day it went out"
