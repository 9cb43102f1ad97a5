"""A DSN to a sender at an internationalised domain stays 7-bit, like every other DSN.

Delivery sends an address whose only non-ASCII part is its domain to an MX without SMTPUTF8 in
A-labels, without SMTPUTF8: the DSN's `To:` then carried raw UTF-8 to a server never offered
it (RFC 6532 header fields need SMTPUTF8 on every hop), the very thing delivery refuses to do
for a sender's own mail (`SMTPUTF8_HEADERS_NOT_OFFERED`)."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy

from services.bounce.dsn import RecipientStatus, build_dsn

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
BOB = RecipientStatus("bob@x.test", "failed", "5.1.1", "550 5.1.1 No such user")


def dsn_to(sender: str) -> bytes:
    return build_dsn(
        reporting_mta="relais.example",
        from_address="MAILER-DAEMON@relais.example",
        to_address=sender,
        original_headers=b"From: news\r\nSubject: hi\r\n\r\n",
        recipients=[BOB],
        arrival_date=NOW,
        message_id="<dsn.1@relais.example>",
        date=NOW,
    )


def test_an_idn_sender_domain_goes_in_a_labels() -> None:
    raw = dsn_to("news@münchen.test")

    assert raw.isascii(), "no SMTPUTF8 is needed to deliver it, so no UTF-8 may be in it"
    assert email.message_from_bytes(raw, policy=policy.default)["To"] == "news@xn--mnchen-3ya.test"


def test_a_non_ascii_local_part_is_kept_as_given() -> None:
    # It has no ASCII form: its RCPT TO needs SMTPUTF8, which carries the UTF-8 field too.
    raw = dsn_to("jürgen@münchen.test")

    assert "To: jürgen@münchen.test\r\n".encode() in raw
