"""Limit arithmetic and names (the counters themselves are exercised against a real NATS)."""

from __future__ import annotations

import pytest

from services.core.accounts import AccountRecordError, decode_account, encode_account
from services.core.config import AccountConfig
from services.core.topology import SubjectError, limit_subject, parse_limit_subject
from services.ingress.limits import ip_token, rate_verdict, user_token, windows
from services.ingress.replies import DAILY_LIMIT, HOURLY_LIMIT


def test_rate_verdicts() -> None:
    acct = AccountConfig(password_hash="scrypt$x", max_messages_per_hour=10, max_messages_per_day=15)
    assert rate_verdict(acct, 10, 10) is None
    assert rate_verdict(acct, 11, 11) == HOURLY_LIMIT
    assert rate_verdict(acct, 5, 16) == DAILY_LIMIT
    assert rate_verdict(AccountConfig(password_hash="scrypt$x"), 10**9, 10**9) is None


def test_windows_are_utc_hour_and_day() -> None:
    assert windows(0) == (0, 0)
    assert windows(86400 + 3600 * 2 + 5) == (26, 1)


def test_limit_subject_round_trip() -> None:
    subject = limit_subject("msg-hour", "acme", 493000)
    assert subject == "relais.limits.msg-hour.acme.493000"
    assert parse_limit_subject(subject) == ("msg-hour", "acme", 493000)
    with pytest.raises(SubjectError):
        limit_subject("msg-week", "acme", 1)
    with pytest.raises(SubjectError):
        limit_subject("authfail-ip", "1.2.3.4", 1)
    with pytest.raises(SubjectError):
        parse_limit_subject("relais.limits.msg-hour.acme")


def test_tokens_for_untrusted_names() -> None:
    assert ip_token("192.0.2.1") == "192-0-2-1"
    assert ip_token("2001:db8::1") == "2001_db8__1"
    limit_subject("authfail-ip", ip_token("2001:db8::1"), 1)
    token = user_token("evil.user>*")
    limit_subject("authfail-user", token, 1)
    assert token == user_token("EVIL.user>*")


def test_account_record_round_trip() -> None:
    acct = AccountConfig(
        password_hash="scrypt$16384$8$1$c2FsdA==$ZGlnZXN0",
        domains=["acme.test"],
        pool="default",
        pools=["bulk"],
        max_messages_per_hour=100,
        max_sessions=3,
    )
    assert decode_account(encode_account(acct)) == acct


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"password_hash": "plaintext"}',
        b'{"domains": []}',
        b'{"username": "a", "password_hash": 5}',
    ],
)
def test_invalid_account_records_rejected(data: bytes) -> None:
    with pytest.raises(AccountRecordError):
        decode_account(data)


def test_session_registry_ignores_stale_replicas() -> None:
    import time

    from services.core.topology import SESSIONS_TTL
    from services.ingress.limits import SessionRegistry

    registry = SessionRegistry(js=None, replica="me")  # type: ignore[arg-type]
    now = time.monotonic()
    registry._others["acme"] = {"alive": (2, now), "crashed": (5, now - SESSIONS_TTL - 1)}
    registry._others["other"] = {"alive": (7, now)}
    registry._others["gone"] = {"crashed": (1, now - SESSIONS_TTL - 1)}
    registry._mine["acme"] = 1
    assert registry.open_sessions("acme") == 3
    assert registry.open_sessions("gone") == 0
    # A crashed replica (a new name at each pod restart) sends no delete: its counts are
    # forgotten once stale, so neither memory nor each AUTH's look grows with restarts.
    assert registry._others == {"acme": {"alive": (2, now)}, "other": {"alive": (7, now)}}


def test_admin_describe() -> None:
    from services.ingress.admin import describe

    acct = AccountConfig(
        password_hash="scrypt$x",
        domains=["acme.test"],
        pools=["bulk"],
        max_messages_per_hour=10,
        disabled=True,
    )
    line = describe("acme", acct)
    assert (
        "disabled" in line and "pools=default,bulk" in line and "10/h" in line and "domains=acme.test" in line
    )


def test_mail_precheck_uses_the_last_count_seen() -> None:
    from services.ingress.limits import MessageRates

    rates = MessageRates(counters=None)  # type: ignore[arg-type]
    acct = AccountConfig(password_hash="scrypt$x", max_messages_per_hour=3, max_messages_per_day=100)
    now = 86400 * 10 + 3600 * 5 + 10
    assert rates.check("acme", acct, now) is None  # nothing seen yet: DATA decides
    rates._remember("acme", now, 2, 2)
    assert rates.check("acme", acct, now) is None
    rates._remember("acme", now, 3, 3)
    assert rates.check("acme", acct, now) == HOURLY_LIMIT
    assert rates.check("acme", acct, now + 3600) is None  # next hour: the old count is stale
    rates._remember("acme", now, 1, 100)
    assert rates.check("acme", acct, now + 3600) == DAILY_LIMIT
