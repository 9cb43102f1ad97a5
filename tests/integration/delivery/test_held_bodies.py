"""A delivery worker holds at most `delivery.max_buffered_bytes` of stored bodies at once: jobs
of large messages wait for room before they fetch their body, instead of a few of them at once
taking the pod past its memory limit (killed, the jobs come back and kill the next worker).

The sink stalls each RCPT, so jobs that hold their bodies at the same time are sessions open at
the same time: with room for one body, one session; without a budget, several."""

from __future__ import annotations

import pytest

from tests.support.relais import asubmit, message, wait_for_events

LARGE_BODY = ("x" * 76 + "\r\n") * 2700  # about 210 KB: stored in the Object Store, not inline


@pytest.mark.parametrize(("budget", "alone"), [(300_000, True), (0, False)], ids=["budget", "no-budget"])
async def test_large_bodies_wait_for_room(make_stack, make_sink, budget: int, alone: bool) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_rcpt = 1.5
    stack = await make_stack(delivery={"max_buffered_bytes": budget, "concurrency": 8})
    for i in range(3):
        data = message(subject=f"m{i}", body=LARGE_BODY)
        code, _ = await asubmit(stack.smtp_address, recipients=[f"r{i}@alpha.test"], data=data)
        assert code == 250
    await sink.async_wait_for(3, timeout=60)
    await wait_for_events(stack.config.nats.url, "delivered", 3)
    if alone:
        assert sink.peak_sessions == 1, "a second body was held while the first was"
    else:
        assert sink.peak_sessions >= 2, "the jobs did not overlap: this test shows nothing"
