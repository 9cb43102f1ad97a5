"""A warming IP's daily cap holds across two router replicas; the rest overflows to the warm IP."""

from __future__ import annotations

import time
from collections import Counter

import nats

from services.core.config import PoolConfig, SourceConfig, WarmupConfig
from services.core.topology import WARMUP_BUCKET
from services.router.warmup import OTHER_SCOPE, counter_key, utc_day
from tests.integration.router.conftest import account, asubmit_many
from tests.support.relais import SENDER_DOMAIN, message, wait_for_events

WARMING, WARM = "127.0.0.13", "127.0.0.14"
CAP = 3


async def test_cap_holds_across_replicas_and_overflow_goes_to_the_warm_ip(make_stack, make_sink) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    sections = dict(
        pools={
            "default": PoolConfig(),
            "warming": PoolConfig(
                sources=[
                    # Weighted so the warming IP is drawn first most of the time: its cap must stop it.
                    SourceConfig(address=WARMING, weight=5, warmup="new-ip", warmup_start=today),
                    SourceConfig(address=WARM, weight=1),
                ]
            ),
        },
        warmup={"new-ip": WarmupConfig(daily=[CAP, 10 * CAP], overflow="warm")},
        accounts=account("warming"),
    )
    stack = await make_stack(**sections)
    await make_stack(services=("router",), **sections)  # a second router replica, racing the first
    sink = make_sink("127.0.0.2")
    batch = [(f"news@{SENDER_DOMAIN}", ["w@alpha.test"], message(subject=f"w{i}")) for i in range(12)]
    await asubmit_many(stack.smtp_address, batch)
    received = await sink.async_wait_for(12, timeout=60)
    assert Counter(m.peer[0] for m in received) == {WARMING: CAP, WARM: 12 - CAP}
    delivered = await wait_for_events(stack.config.nats.url, "delivered", 12)
    assert Counter(e.source_ip for e in delivered)[WARMING] == CAP

    nc = await nats.connect(stack.config.nats.url)
    try:
        kv = await nc.jetstream().key_value(WARMUP_BUCKET)
        entry = await kv.get(counter_key(utc_day(time.time()), WARMING, OTHER_SCOPE))
        assert int(entry.value or b"0") == CAP
    finally:
        await nc.close()
