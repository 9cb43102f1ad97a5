"""Reports about reports: a bounce that returns a feedback report (an account that sends ARF
reports, whose report could not be delivered) is a bounce of that report's recipient, never a
complaint about whoever the returned report names; and an auto-reply (RFC 3834) is no
bounce."""

from __future__ import annotations

import pytest
from flufl.bounce._detectors.llnl import LLNL
from flufl.bounce._scan import _DETECTORS as FLUFL_DETECTORS

from services.bounce import parse
from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.core.returnpath import verp_address
from tests.support.bounce_samples import arf_report, postfix_dsn
from tests.unit.test_bounce_inbound import CONFIG, DOMAIN, FBL, MESSAGE_ID


def _rp(recipients: list[str]) -> str:
    return verp_address(
        prefix="b",
        domain=DOMAIN,
        secret=CONFIG.verp_secrets[0],
        account="acme",
        message_id=MESSAGE_ID,
        recipients=recipients,
    )


def _dsn_returning(report: bytes, *, to: str, recipient: str, action: str = "failed") -> bytes:
    """Postfix's DSN for `recipient`, with the whole undelivered message (`report`) returned."""
    dsn = postfix_dsn(to=to, recipient=recipient).replace(b"Action: failed", f"Action: {action}".encode())
    head, _, _ = dsn.rpartition(b"--B0UND\r\nContent-Type: text/rfc822-headers")
    return head + b"--B0UND\r\nContent-Type: message/rfc822\r\n\r\n" + report + b"\r\n--B0UND--\r\n"


def test_a_bounced_feedback_report_is_a_bounce_of_its_recipient() -> None:
    # acme sent one ARF report to abuse@provider.test; it bounced 5.1.1, the report returned.
    to = _rp(["abuse@provider.test"])
    sent = arf_report(to="abuse@provider.test", recipient="angry@gamma.test", return_path=to)
    verdict = findings(
        _dsn_returning(sent, to=to, recipient="abuse@provider.test"), [to], CONFIG, DEFAULT_RULES
    )
    assert [(f.kind, f.recipient, f.suppresses) for f in verdict.findings] == [
        ("bounced", "abuse@provider.test", True)
    ]


def test_a_bounced_feedback_report_is_no_complaint_of_the_address_it_names() -> None:
    # Sent to two addresses at provider.test, the token vouches for that domain: the complainer
    # the returned report names, at the same domain, must not be taken for a complainer of ours.
    to = _rp(["abuse@provider.test", "postmaster@provider.test"])
    sent = arf_report(to="abuse@provider.test", recipient="reader@provider.test", return_path=to)
    for action in ("failed", "delayed"):
        raw = _dsn_returning(sent, to=to, recipient="abuse@provider.test", action=action)
        verdict = findings(raw, [to], CONFIG, DEFAULT_RULES)
        assert not [f for f in verdict.findings if f.kind == "complained"]
        assert not [f for f in verdict.findings if f.recipient != "abuse@provider.test"]
        assert [f.permanent for f in verdict.findings] == [action == "failed"]


def test_a_feedback_report_still_counts_when_sent_to_the_feedback_address() -> None:
    # The loop guard must not cost the ordinary report.
    to = _rp(["angry@gamma.test"])
    verdict = findings(
        arf_report(to=FBL, recipient="angry@gamma.test", return_path=to), [FBL], CONFIG, DEFAULT_RULES
    )
    assert [(f.kind, f.recipient) for f in verdict.findings] == [("complained", "angry@gamma.test")]


@pytest.mark.parametrize(
    "body",
    [
        "I am out of the office until Monday. Mail to jane@alpha.test is read on my return;\r\n"
        "my mailbox is full, so please resend anything urgent to desk@alpha.test.",
        # An address between commas was all flufl.bounce's LLNL detector wanted to see a failure.
        "I am away until 5 June. For urgent matters, jane@alpha.test, please call the desk.",
        "Thank you for your message. I have left Alpha; this mailbox, jane@alpha.test, is no longer active.",
        "I am out of the office.\r\n\r\n-----Original Message-----\r\nTo: jane@alpha.test\r\n\r\n"
        "Hello, jane@alpha.test, here is our news.",
    ],
)
def test_an_auto_reply_to_the_return_path_is_no_bounce(body: str) -> None:
    to = _rp(["jane@alpha.test"])
    raw = (
        "From: Jane <jane@alpha.test>\r\n"
        f"To: {to}\r\n"
        "Subject: Automatic reply: Hello\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "\r\n" + body + "\r\n"
    ).encode()
    assert parse.parse_bounce(parse.parse_message(raw)).kind == "none"
    verdict = findings(raw, [to], CONFIG, DEFAULT_RULES)
    assert verdict.findings == [] and verdict.rejected == ["not a bounce or feedback report"]


def test_only_flufls_llnl_detector_is_left_out() -> None:
    # A flufl.bounce upgrade that renames or reorders its detectors must be looked at again.
    assert LLNL in FLUFL_DETECTORS
    assert list(parse._DETECTORS) == [d for d in FLUFL_DETECTORS if d is not LLNL]
