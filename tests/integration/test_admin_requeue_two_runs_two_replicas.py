"""`relais requeue` as an operator uses it in a scaled-out cluster: deferred mail for a site, two
delivery replicas, and the command started twice at once (two operators, or a retried script).
Every deferred job is tried again once, now rather than an hour later: each recipient gets one
copy, none is left deferred, and each message's history ends in one `delivered` per recipient.
(The race of a single schedule firing under a run is in test_admin_queue_race.py.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from services.core.addresses import recipient_key
from tests.integration.spine.conftest import _stop_made_stacks, make_stack, zone  # noqa: F401 - fixtures
from tests.support.relais import asubmit, message, read_events, relais_cli, wait_for_events
from tests.support.smtp_sink import SMTPSink

HOUR = 3600.0
JOBS = 4
TWO_REPLICAS = ("ingress", "router", "delivery", "delivery", "bounce")


async def test_two_requeues_at_once_with_two_replicas_deliver_each_job_once(
    make_stack: Callable[..., Any],  # noqa: F811 - the fixture imported above
    make_sink: Callable[..., SMTPSink],
) -> None:
    stack = await make_stack(
        TWO_REPLICAS, retry={"base_delay": HOUR, "max_delay": HOUR, "max_age": 5 * 24 * HOUR}
    )
    url = stack.config.nats.url
    sink = make_sink("127.0.0.2")
    sink.tempfail_data = JOBS
    recipients = [f"r{i}@alpha.test" for i in range(JOBS)]
    ids = []
    for rcpt in recipients:
        code, reply = await asubmit(stack.smtp_address, recipients=[rcpt], data=message())
        assert code == 250
        ids.append(reply.decode().rsplit(" ", 1)[-1])
    await wait_for_events(url, "deferred", JOBS)
    assert sink.messages == []

    runs = await asyncio.gather(*(relais_cli("requeue", "alpha.test", nats_url=url) for _ in range(2)))
    for rc, out in runs:
        assert rc == 0, out
    requeued = Counter(
        line.split()[1] for _, out in runs for line in out.splitlines() if line.startswith("requeued ")
    )
    assert len(requeued) == JOBS, runs  # every job, by one run or both (a replacement taken over again)

    got = await sink.async_wait_for(JOBS, timeout=30)  # an hour early
    await asyncio.sleep(3)  # a second copy would come within moments
    copies = Counter(recipient_key(r) for m in sink.messages for r in m.rcpt_tos)
    assert copies == Counter(recipients), [m.rcpt_tos for m in got]

    delivered = await wait_for_events(url, "delivered", JOBS)
    assert sorted(e.message_id for e in delivered) == sorted(ids)
    assert {e.attempt for e in delivered} == {2}, "the retry is the job's second attempt"
    events = await read_events(url)
    assert Counter(e.kind for e in events if e.kind in ("delivered", "bounced", "expired")) == {
        "delivered": JOBS
    }

    rc, out = await relais_cli("status", "--interval", "0", nats_url=url)
    assert rc == 0 and "DEFERRED: none" in out and "QUEUED: none" in out, out
    for message_id in ids:
        rc, out = await relais_cli("message", message_id, nats_url=url)
        assert rc == 0 and out.splitlines()[-1] == "final: delivered", out
