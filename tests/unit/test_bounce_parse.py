"""Relais' own DSNs read back by the inbound parser: the two halves agree on recipients and codes."""

from __future__ import annotations

from datetime import UTC, datetime

from services.bounce.classify import BounceCategory
from services.bounce.dsn import RecipientStatus, build_dsn
from services.bounce.parse import parse_bounce, parse_message

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_own_dsn_parses_with_original_recipient_and_category() -> None:
    raw = build_dsn(
        reporting_mta="relais.test",
        from_address="MAILER-DAEMON@relais.test",
        to_address="news@acme.test",
        original_headers=b"Subject: hi\r\n\r\n",
        recipients=[
            RecipientStatus(
                final_recipient="robert@mail.alpha.test",  # an alias the remote expanded to
                original_recipient="rfc822;bob@alpha.test",
                action="failed",
                status="5.1.1",
                diagnostic_code="550 5.1.1 User unknown",
                remote_mta="mx.alpha.test",
                last_attempt=NOW,
            ),
            RecipientStatus(
                final_recipient="carol@alpha.test",
                action="delayed",
                status="4.2.2",
                diagnostic_code="452 4.2.2 Mailbox full",
                will_retry_until=NOW,
            ),
        ],
        arrival_date=NOW,
        message_id="<d1@relais.test>",
        date=NOW,
    )
    result = parse_bounce(parse_message(raw))
    assert result.kind == "dsn" and result.reporting_mta == "relais.test"
    bob, carol = result.recipients
    assert (bob.recipient, bob.also_known_as) == ("bob@alpha.test", "robert@mail.alpha.test")
    assert bob.permanent and bob.status == "5.1.1" and bob.code == 550
    assert bob.category is BounceCategory.INVALID_RECIPIENT and bob.remote_mta == "mx.alpha.test"
    assert not carol.permanent and carol.category is BounceCategory.QUOTA_ISSUES
    assert result.original is not None and result.original["Subject"] == "hi"


def test_an_ordinary_message_is_not_a_bounce() -> None:
    raw = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: lunch?\r\n\r\nAre you free at noon?\r\n"
    assert parse_bounce(parse_message(raw)).kind == "none"
