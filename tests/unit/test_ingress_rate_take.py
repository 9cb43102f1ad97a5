"""What a message takes of its account's two rate counters is given back exactly: the counters
JetStream acknowledged, once, each with a msg id that makes a repeated refund a no-op; never a
counter whose increment failed. (The counters themselves run against a real nats-server in
tests/integration/ingress/test_quota_one_counter_fails.py; here a stand-in records what
`MessageRates` asks of them.)"""

from __future__ import annotations

import pytest

from services.core.bus import BrokerUnavailable
from services.core.config import AccountConfig
from services.ingress.limits import Counters, MessageRates
from services.ingress.replies import HOURLY_LIMIT


class RecordedCounters(Counters):
    """Counters kept in a dict; increments of a subject containing `failing` are refused, and
    the first `lost_refunds` refunds are applied with their ack lost."""

    def __init__(self, failing: str = "", lost_refunds: int = 0) -> None:
        self.values_by_subject: dict[str, int] = {}
        self.refund_ids: list[str] = []
        self._applied: set[str] = set()
        self._failing = failing
        self._lost_refunds = lost_refunds

    async def add(self, subject: str, delta: int = 1) -> int:
        if self._failing and self._failing in subject:
            raise BrokerUnavailable(f"counter {subject}: no responders")
        self.values_by_subject[subject] = self.values_by_subject.get(subject, 0) + delta
        return self.values_by_subject[subject]

    async def add_once(self, subject: str, delta: int, msg_id: str) -> int | None:
        self.refund_ids.append(msg_id)
        if msg_id in self._applied:
            return None
        self._applied.add(msg_id)
        value = await self.add(subject, delta)
        if self._lost_refunds:
            self._lost_refunds -= 1
            raise BrokerUnavailable(f"counter {subject}: timeout", maybe_stored=True)
        return value


ACCOUNT = AccountConfig(password_hash="scrypt$x", max_messages_per_hour=2, max_messages_per_day=100)


def _counts(counters: RecordedCounters) -> dict[str, int]:
    """Counter values by kind (msg-hour, msg-day)."""
    return {subject.split(".")[2]: value for subject, value in counters.values_by_subject.items()}


async def test_a_failed_day_counter_gives_the_hour_back() -> None:
    counters = RecordedCounters(failing=".msg-day.")
    rates = MessageRates(counters)
    for attempt in range(3):  # a client retrying after each 451: a new message id each time
        with pytest.raises(BrokerUnavailable):
            await rates.reserve("acme", ACCOUNT, f"m{attempt}")
    assert _counts(counters) == {"msg-hour": 0}
    assert rates.check("acme", ACCOUNT) is None


async def test_a_refund_is_given_once_however_often_it_is_asked() -> None:
    counters = RecordedCounters()
    rates = MessageRates(counters)
    verdict, take = await rates.reserve("acme", ACCOUNT, "m1")
    assert verdict is None
    await rates.refund(take)
    await rates.refund(take)  # the hand-off's failure path and a second caller
    assert _counts(counters) == {"msg-hour": 0, "msg-day": 0}
    assert len(counters.refund_ids) == 2


async def test_a_refund_whose_ack_was_lost_is_sent_again_and_applied_once() -> None:
    counters = RecordedCounters(lost_refunds=1)
    rates = MessageRates(counters)
    _, take = await rates.reserve("acme", ACCOUNT, "m1")
    await rates.refund(take)
    assert _counts(counters) == {"msg-hour": 0, "msg-day": 0}
    # The repeat carried the same msg id, so JetStream would drop it as a duplicate.
    assert len(counters.refund_ids) == 3 and len(set(counters.refund_ids)) == 2


async def test_over_the_limit_the_message_is_refused_and_not_counted() -> None:
    counters = RecordedCounters()
    rates = MessageRates(counters)
    results = [(await rates.reserve("acme", ACCOUNT, f"m{i}"))[0] for i in range(3)]
    assert results == [None, None, HOURLY_LIMIT]
    assert _counts(counters) == {"msg-hour": 2, "msg-day": 2}
    assert rates.check("acme", ACCOUNT) == HOURLY_LIMIT
