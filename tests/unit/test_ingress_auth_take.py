"""What an AUTH attempt takes of its two failure counters (per client IP, per username) is given
back exactly when its password is right: the counters JetStream acknowledged, once, each with a
msg id that makes a repeated refund a no-op. A counter that failed neither lets the other's
increment stay nor hides what the other one says. (Against a real nats-server:
tests/integration/ingress/test_auth_one_counter_fails.py; here a stand-in records what
`AuthThrottle` asks of the counters.)"""

from __future__ import annotations

from services.ingress.limits import AuthThrottle
from tests.unit.test_ingress_rate_take import RecordedCounters

IP, USER = "192.0.2.7", "acme"


def _counts(counters: RecordedCounters) -> dict[str, int]:
    """Counter values by kind (authfail-ip, authfail-user)."""
    return {subject.split(".")[2]: value for subject, value in counters.values_by_subject.items()}


async def test_a_right_password_gives_back_the_ip_count_when_the_user_counter_failed() -> None:
    counters = RecordedCounters(failing=".authfail-user.")
    throttle = AuthThrottle(counters, max_failures=3, lockout=600)
    for _ in range(5):  # the owner logging in again and again while the fault lasts
        take = await throttle.reserve(IP, USER)
        assert take is not None
        await throttle.refund(take)
    assert _counts(counters) == {"authfail-ip": 0}


async def test_a_refund_is_given_once_however_often_it_is_asked() -> None:
    counters = RecordedCounters()
    throttle = AuthThrottle(counters, max_failures=3, lockout=600)
    take = await throttle.reserve(IP, USER)
    assert take is not None
    await throttle.refund(take)
    await throttle.refund(take)
    assert _counts(counters) == {"authfail-ip": 0, "authfail-user": 0}
    assert len(counters.refund_ids) == 2


async def test_a_refund_whose_ack_was_lost_is_sent_again_and_applied_once() -> None:
    counters = RecordedCounters(lost_refunds=1)
    throttle = AuthThrottle(counters, max_failures=3, lockout=600)
    take = await throttle.reserve(IP, USER)
    assert take is not None
    await throttle.refund(take)
    assert _counts(counters) == {"authfail-ip": 0, "authfail-user": 0}
    # The repeat carried the same msg id, so JetStream would drop it as a duplicate.
    assert len(counters.refund_ids) == 3 and len(set(counters.refund_ids)) == 2


async def test_attempts_of_their_own_are_refunded_under_ids_of_their_own() -> None:
    counters = RecordedCounters()
    throttle = AuthThrottle(counters, max_failures=3, lockout=600)
    for _ in range(2):  # the same IP and user, twice: two attempts, two refunds
        take = await throttle.reserve(IP, USER)
        assert take is not None
        await throttle.refund(take)
    assert len(set(counters.refund_ids)) == 4
    assert _counts(counters) == {"authfail-ip": 0, "authfail-user": 0}


async def test_an_ip_over_its_failures_is_refused_though_the_user_counter_failed() -> None:
    counters = RecordedCounters(failing=".authfail-user.")
    throttle = AuthThrottle(counters, max_failures=2, lockout=600)
    answers = [await throttle.reserve(IP, USER) is not None for _ in range(3)]
    assert answers == [True, True, False]
