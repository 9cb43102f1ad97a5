"""`patiently`: outcomes and acks are asked again through a leader election, then given up."""

from __future__ import annotations

import pytest

from services.core import bus as transport
from services.core.bus import BrokerUnavailable, patiently


async def test_tries_again_until_jetstream_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport.asyncio, "sleep", _no_sleep)
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BrokerUnavailable("electing a leader", maybe_stored=True)

    await patiently(attempt, "outcomes of test")
    assert calls == 3


async def test_gives_up_after_the_patience_and_raises_the_last_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "ACK_PATIENCE", 0.0)

    async def attempt() -> None:
        raise TimeoutError("no leader")

    with pytest.raises(TimeoutError):
        await patiently(attempt, "ack")


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug, not an election")

    with pytest.raises(ValueError):
        await patiently(attempt, "outcomes of test")
    assert calls == 1


async def _no_sleep(_: float) -> None:
    return None
