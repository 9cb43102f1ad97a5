"""With overflow = "defer", jobs beyond a warming IP's daily cap wait (4.4.5) instead of
going out from another IP."""

from __future__ import annotations

import asyncio
import time

from services.core.config import PoolConfig, SourceConfig, WarmupConfig
from services.router.warmup import WARMUP_DEFERRED
from tests.integration.router.conftest import account, asubmit_many
from tests.support.relais import SENDER_DOMAIN, message, wait_for_events

WARMING = "127.0.0.13"


async def test_jobs_over_the_cap_are_deferred_not_sent(make_stack, make_sink) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    stack = await make_stack(
        pools={
            "default": PoolConfig(),
            "warming": PoolConfig(
                sources=[SourceConfig(address=WARMING, warmup="new-ip", warmup_start=today)]
            ),
        },
        warmup={"new-ip": WarmupConfig(daily=[2], overflow="defer")},
        accounts=account("warming"),
    )
    sink = make_sink("127.0.0.2")
    batch = [(f"news@{SENDER_DOMAIN}", [f"d{i}@alpha.test"], message(subject=f"d{i}")) for i in range(5)]
    await asubmit_many(stack.smtp_address, batch)
    received = await sink.async_wait_for(2)
    deferred = await wait_for_events(stack.config.nats.url, "deferred", 3)
    assert {m.peer[0] for m in received} == {WARMING}
    first_round = [e for e in deferred if e.attempt == 1]
    assert len({e.job_id for e in first_round}) == 3
    assert all(e.reply is not None and e.reply["code"] == WARMUP_DEFERRED.code for e in first_round)
    assert all(e.reply["enhanced"] == WARMUP_DEFERRED.enhanced_status for e in first_round)  # type: ignore[index]
    await asyncio.sleep(2.5)  # retries (1 s backoff here) come back and are deferred again
    assert len(sink.messages) == 2, "nothing beyond the cap left the warming IP"
