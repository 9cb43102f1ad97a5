"""`past_the_client`: a hand-off started after the final dot runs to its end when the session's
task is cancelled (its client left), however often it is; the session then ends cancelled. The
scenario with sockets and nats-server is tests/integration/ingress/
test_quota_client_leaves_during_handoff.py."""

from __future__ import annotations

import asyncio

import pytest

from services.ingress.handoff import past_the_client


async def test_the_work_finishes_though_the_session_is_cancelled_twice() -> None:
    release = asyncio.Event()
    steps: list[str] = []

    async def hand_off() -> str:
        steps.append("counted")
        await release.wait()
        steps.append("queued")
        return "250"

    session = asyncio.create_task(past_the_client(hand_off()))
    await asyncio.sleep(0)
    session.cancel()  # aiosmtpd: EOF over TLS...
    await asyncio.sleep(0)
    session.cancel()  # ...then connection_lost
    await asyncio.sleep(0)
    assert not session.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await session
    assert steps == ["counted", "queued"]


async def test_without_cancellation_the_reply_comes_back() -> None:
    async def hand_off() -> str:
        return "250 2.0.0 Ok"

    assert await past_the_client(hand_off()) == "250 2.0.0 Ok"
