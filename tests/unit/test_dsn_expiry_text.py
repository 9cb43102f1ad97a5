"""The human-readable part of a DSN does not put Relais' own words in an MX's mouth.

An expiry's "554 4.4.7 Message expired ...; last reply: 450 ..." is typed `x-relais` in the
delivery-status part, because no server answered 554; the notification text still read
"host mx.alpha.test said: 554 4.4.7 Message expired", telling the person who reads it that the
MX had refused the message for good. Postfix writes "host ... said:" only before a reply that
host gave."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy

from services.bounce.dsn import DIAGNOSTIC_LOCAL, RecipientStatus, build_dsn

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
EXPIRY = (
    "554 4.4.7 Message expired: delivery not possible within the maximum queue age; "
    "last reply: 450 4.2.0 Mailbox busy"
)


def notification(status: RecipientStatus) -> str:
    raw = build_dsn(
        reporting_mta="relais.example",
        from_address="MAILER-DAEMON@relais.example",
        to_address="alice@sender.test",
        original_headers=b"From: alice@sender.test\r\nSubject: hi\r\n\r\n",
        recipients=[status],
        arrival_date=NOW,
        message_id="<dsn.1@relais.example>",
        date=NOW,
    )
    text = email.message_from_bytes(raw, policy=policy.default).get_payload()[0].get_content()
    return " ".join(text.split())


def test_an_expiry_is_not_what_the_last_host_said() -> None:
    expired = RecipientStatus(
        "later@alpha.test",
        "failed",
        "4.4.7",
        EXPIRY,
        remote_mta="mx.alpha.test",
        diagnostic_type=DIAGNOSTIC_LOCAL,
    )

    text = notification(expired)

    assert "said: 554" not in text
    assert f"<later@alpha.test>: {EXPIRY}" in text
    assert "mx.alpha.test" in text, "which host was tried last is still told"


def test_a_reply_from_the_host_is_still_what_it_said() -> None:
    refused = RecipientStatus(
        "gone@alpha.test", "failed", "5.1.1", "550 5.1.1 No such user", remote_mta="mx.alpha.test"
    )

    assert "<gone@alpha.test>: host mx.alpha.test said: 550 5.1.1 No such user" in notification(refused)
