"""Webhook payloads, signatures and back-off (the HTTP side is in tests/integration/bounce)."""

from __future__ import annotations

import json

import pytest

from services.bounce.webhooks import (
    SIGNATURE_HEADER,
    SIGNATURES_HEADER,
    backoff,
    entries,
    sign,
    signature_headers,
    verify_signature,
)
from services.core.accounts import AccountRecordError, decode_account, encode_account
from services.core.config import AccountConfig, BounceConfig
from services.core.events import Event

SECRET = "whsec-0123456789abcdef"


def test_signature_verifies_and_rejects_tampering_and_replays() -> None:
    body = b'[{"event":"bounced"}]'
    signature = sign(SECRET, 1_700_000_000, body)
    assert signature.startswith("v1=")
    assert verify_signature(SECRET, "1700000000", body, signature, now=1_700_000_010)
    assert not verify_signature(SECRET, "1700000000", body + b" ", signature, now=1_700_000_010)
    assert not verify_signature("other-secret-0123456", "1700000000", body, signature, now=1_700_000_010)
    assert not verify_signature(SECRET, "1700000001", body, signature, now=1_700_000_010)
    assert not verify_signature(SECRET, "1700000000", body, signature, now=1_700_009_999), "stale"
    assert not verify_signature(SECRET, "1700000000", body, "v1=é", now=1_700_000_010), "False, not raise"


def test_during_a_rotation_s_overlap_both_secrets_sign_and_after_it_only_the_new_one() -> None:
    body, ts = b'[{"event":"delivered"}]', 1_700_000_000
    account = AccountConfig(
        password_hash="-",
        webhook_url="https://hooks.example.test/relais",
        webhook_secret="whsec-new-0123456789",
        webhook_previous_secret=SECRET,
        webhook_previous_secret_until=ts + 60,
    )
    during = signature_headers(account, ts, body, now=ts + 59.5)
    # The field receivers compare whole stays one signature, under the current secret.
    assert during[SIGNATURE_HEADER] == sign("whsec-new-0123456789", ts, body)
    for secret in ("whsec-new-0123456789", SECRET):
        assert verify_signature(secret, str(ts), body, during[SIGNATURES_HEADER], now=ts)
    assert not verify_signature("whsec-other-0123456789", str(ts), body, during[SIGNATURES_HEADER], now=ts)

    after = signature_headers(account, ts, body, now=ts + 60)
    assert after[SIGNATURES_HEADER] == after[SIGNATURE_HEADER]
    assert not verify_signature(SECRET, str(ts), body, after[SIGNATURES_HEADER], now=ts)


def test_a_rotation_overlap_round_trips_through_the_record_and_a_mistyped_one_is_refused() -> None:
    account = AccountConfig(
        password_hash="scrypt$x",
        webhook_url="https://hooks.example.test/relais",
        webhook_secret="whsec-new-0123456789",
        webhook_previous_secret=SECRET,
        webhook_previous_secret_until=1_700_000_060.25,
    )
    assert decode_account(encode_account(account)) == account
    # Hand-edited: refused like any invalid record, not raised in every bounce replica's watch.
    record = json.loads(encode_account(account))
    for field, value in [("webhook_previous_secret_until", "tomorrow"), ("webhook_previous_secret", 5)]:
        with pytest.raises(AccountRecordError):
            decode_account(json.dumps({**record, field: value}).encode())


def test_an_event_from_a_newer_release_is_read_without_its_new_fields() -> None:
    event = Event(kind="delivered", message_id="m1", account="acme", recipients=["a@x.test"])
    record = {**json.loads(event.to_json()), "added_later": 1}
    assert Event.from_json(json.dumps(record).encode()) == event


def test_entries_are_sendgrid_style_one_per_recipient() -> None:
    event = Event(
        kind="bounced",
        message_id="m1",
        account="acme",
        recipients=["a@x.test", "b@x.test"],
        at=1_700_000_000.5,
        reply={"code": 550, "enhanced": "5.1.1", "text": "User unknown", "command": "RCPT"},
        detail={"category": "invalid_recipient"},
    )
    out = entries(event, "RELAIS_EVENTS-7")
    assert [e["email"] for e in out] == ["a@x.test", "b@x.test"]
    assert [e["event_id"] for e in out] == ["RELAIS_EVENTS-7.0", "RELAIS_EVENTS-7.1"]
    first = out[0]
    assert first["event"] == "bounced" and first["timestamp"] == 1_700_000_000
    assert first["category"] == "invalid_recipient" and first["response"] == "550 5.1.1 User unknown"
    json.dumps(out)  # plain JSON types only


def test_backoff_doubles_up_to_the_cap() -> None:
    config = BounceConfig(webhook_retry_base=5.0, webhook_retry_max=60.0)
    assert [backoff(n, config) for n in (1, 2, 3, 4, 5, 9)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    # A receiver down for the events' whole retention at a short cap: 2 ** 1024 would overflow.
    assert backoff(10_081, config) == 60.0
