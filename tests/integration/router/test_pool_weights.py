"""Source weights inside a pool hold over a few hundred delivery jobs (within tolerance)."""

from __future__ import annotations

from collections import Counter

from services.core.config import PoolConfig, SourceConfig
from tests.integration.router.conftest import account, asubmit_many
from tests.support.relais import SENDER_DOMAIN, message

JOBS_PER_DOMAIN = 70


async def test_weights_split_traffic_three_to_one(make_stack, make_sink) -> None:
    pools = {
        "default": PoolConfig(),
        "weighted": PoolConfig(
            sources=[
                SourceConfig(address="127.0.0.11", weight=3),
                SourceConfig(address="127.0.0.12", weight=1),
            ]
        ),
    }
    stack = await make_stack(pools=pools, accounts=account("weighted"))
    sinks = [make_sink(ip) for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
    recipients = ["w@alpha.test", "w@beta.test", "w@gamma.test"]  # three jobs per message
    batch = [(f"news@{SENDER_DOMAIN}", recipients, message(subject=f"w{i}")) for i in range(JOBS_PER_DOMAIN)]
    await asubmit_many(stack.smtp_address, batch)
    received = [m for sink in sinks for m in await sink.async_wait_for(JOBS_PER_DOMAIN, timeout=90)]
    by_source = Counter(m.peer[0] for m in received)
    total = 3 * JOBS_PER_DOMAIN
    assert sum(by_source.values()) == total and set(by_source) == {"127.0.0.11", "127.0.0.12"}
    # Expected 157.5 of 210 from the weight-3 source; binomial sd is about 6.3: allow 4 sd.
    assert abs(by_source["127.0.0.11"] - total * 3 / 4) < 26, by_source
