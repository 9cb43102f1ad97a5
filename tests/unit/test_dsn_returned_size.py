"""What a RET=FULL DSN returns of a large original: its headers only, as Postfix does past
bounce_size_limit."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy

from services.bounce.dsn import MAX_RETURNED, RecipientStatus, build_dsn

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
HEADERS = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@x.test\r\n"
    b"Subject: the big attachment\r\n"
    b"Message-ID: <orig.1@sender.test>\r\n"
    b"\r\n"
)
BOB = RecipientStatus(final_recipient="bob@x.test", action="failed", status="5.1.1", diagnostic_code="550 no")


def dsn_returning(original: bytes) -> bytes:
    return build_dsn(
        reporting_mta="relais.example",
        from_address="MAILER-DAEMON@relais.example",
        to_address="alice@sender.test",
        original_headers=original,
        recipients=[BOB],
        arrival_date=NOW,
        original_message=original,
        message_id="<dsn.1@relais.example>",
        date=NOW,
    )


def test_a_huge_original_is_returned_as_its_headers_only() -> None:
    # RET=FULL of a 5 MB message made a 5 MB DSN (50 MiB for the largest message accepted),
    # which the sender's MX may refuse, and a DSN is never bounced: it was lost. Postfix returns
    # only the headers of a message over bounce_size_limit (50,000 octets).
    big = HEADERS + (b"B" * 76 + b"\r\n") * 70_000

    raw = dsn_returning(big)

    assert len(raw) < 2 * MAX_RETURNED
    msg = email.message_from_bytes(raw, policy=policy.default)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: the big attachment" in returned.get_payload(decode=True)
    notice = " ".join(msg.get_payload()[0].get_content().split())
    assert "only its headers are returned" in notice and "larger than" in notice


def test_an_original_within_the_limit_is_still_returned_whole() -> None:
    small = HEADERS + (b"B" * 76 + b"\r\n") * ((MAX_RETURNED - len(HEADERS)) // 78)
    assert len(small) <= MAX_RETURNED

    msg = email.message_from_bytes(dsn_returning(small), policy=policy.default)

    assert msg.get_payload()[2].get_content_type() == "message/rfc822"


def test_an_oversized_original_read_as_headers_makes_the_same_dsn() -> None:
    # The bounce service reads only the header block of an original too large to go back whole
    # (a 50 MiB attachment is not fetched to return its headers): the DSN must not change.
    big = HEADERS + (b"B" * 76 + b"\r\n") * 70_000
    kwargs = {
        "reporting_mta": "relais.example",
        "from_address": "MAILER-DAEMON@relais.example",
        "to_address": "alice@sender.test",
        "original_headers": HEADERS,
        "recipients": [BOB],
        "arrival_date": NOW,
        "message_id": "<dsn.1@relais.example>",
        "date": NOW,
    }

    assert build_dsn(**kwargs, oversized_original=len(big)) == dsn_returning(big)
    assert build_dsn(**kwargs) != dsn_returning(big), "without the size, it reads as RET=HDRS"
