"""`relais pause site` set while a job for the site is in the middle of its SMTP transaction, and
`relais requeue` run during the pause, against real services, two delivery replicas and a real
MX. The transaction under way ends as it would have (one copy); the jobs that come after are held:
not sent, not deferred, not bounced, no attempt counted, even when the operator requeues them
(they come straight back to the pause); resume releases each of them once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from services.core.addresses import recipient_key
from tests.integration.delivery.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    submit_many,
    zone,
)
from tests.support.relais import read_events, relais_cli, wait_for_events
from tests.support.smtp_sink import SMTPSink

HELD = 3
TWO_REPLICAS = ("ingress", "router", "delivery", "delivery", "bounce")


async def test_a_pause_during_a_transaction_holds_what_follows_until_resume(
    make_stack: Callable[..., Any],  # noqa: F811 - the fixture imported above
    make_sink: Callable[..., SMTPSink],
) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 3.0  # the first job's DATA reply comes after the pause is set
    stack = await make_stack(TWO_REPLICAS)
    url = stack.config.nats.url

    await submit_many(stack, 1, recipient="first@alpha.test")
    for _ in range(100):  # its transaction is under way
        if sink.data_commands:
            break
        await asyncio.sleep(0.05)
    assert sink.data_commands == 1
    rc, out = await relais_cli("pause", "site", "alpha.test", "--reason", "incident", nats_url=url)
    assert rc == 0 and "paused site alpha.test" in out, out
    await asyncio.sleep(0.5)  # the workers' watch sees it
    sink.delay_data = 0.0
    await submit_many(stack, HELD)

    (first,) = await sink.async_wait_for(1, timeout=20)
    assert first.rcpt_tos == ["first@alpha.test"], "the transaction under way ends as it would have"
    await asyncio.sleep(3.0)  # three pause rechecks
    rc, out = await relais_cli("requeue", "alpha.test", nats_url=url)
    assert rc == 0, out
    await asyncio.sleep(2.0)
    assert len(sink.messages) == 1, "nothing more goes to a paused site, requeued or not"
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0 and "incident" in out, out
    # Held by the pause, not deferred: no MX deferred them.
    held_by_status = out.split("HELD RECIPIENTS BY SITE", 1)[1].split("\n\n", 1)[0]
    assert held_by_status.split()[-2:] == ["alpha.test", str(HELD)], out
    assert "DEFERRED: none" in out, out
    assert not [e for e in await read_events(url) if e.kind in ("deferred", "bounced", "expired")]

    rc, out = await relais_cli("resume", "site", "alpha.test", nats_url=url)
    assert rc == 0 and "resumed site alpha.test" in out, out
    await sink.async_wait_for(1 + HELD, timeout=30)
    await asyncio.sleep(3.0)  # a second copy would come within moments
    copies = Counter(recipient_key(r) for m in sink.messages for r in m.rcpt_tos)
    assert copies == Counter(["first@alpha.test", *(f"r{i}@alpha.test" for i in range(HELD))])
    delivered = await wait_for_events(url, "delivered", 1 + HELD)
    assert {e.attempt for e in delivered} == {1}, "waiting while paused is not an attempt"
    assert Counter(e.kind for e in await read_events(url) if e.kind in ("delivered", "bounced")) == {
        "delivered": 1 + HELD
    }
    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert "DEFERRED: none" in out and "QUEUED: none" in out and "PAUSED: nothing" in out, out
    assert "HELD: none" in out, out
