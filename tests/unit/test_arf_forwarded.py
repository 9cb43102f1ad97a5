"""An ARF report forwarded inside a multipart/mixed (an abuse desk's "FW:", or a feedback loop
that wraps its reports) is read as the report it carries, still only as far as its VERP token
vouches for it."""

from __future__ import annotations

from services.bounce.arf import parse_arf
from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.bounce.parse import parse_message
from tests.support.bounce_samples import arf_report
from tests.unit.test_bounce_inbound import CONFIG, FBL, MESSAGE_ID, rp

BOUNDARY = "fw-boundary-1"


def _mixed(*parts: bytes) -> bytes:
    head = (
        "From: <abuse-desk@gamma.test>\r\n"
        f"To: <{FBL}>\r\n"
        "Subject: FW: spam complaint\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"\r\n\r\n'
        f"--{BOUNDARY}\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "Forwarding the report below.\r\n"
    ).encode()
    body = b"".join(f"--{BOUNDARY}\r\n".encode() + part for part in parts)
    return head + body + f"--{BOUNDARY}--\r\n".encode()


def attached(report: bytes) -> bytes:
    """The report as an attached message, as a mail client forwards it."""
    return b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n" + report + b"\r\n"


def inline(report: bytes) -> bytes:
    """The report's own MIME entity as a part: its headers, then its multipart/report body."""
    headers, _, body = report.partition(b"\r\n\r\n")
    kept = [h for h in headers.split(b"\r\n") if h.lower().startswith((b"content-type", b"mime-version"))]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body + b"\r\n"


def test_a_report_attached_to_a_forward_is_a_complaint_of_its_recipient() -> None:
    report = arf_report(to=FBL, recipient="angry@gamma.test", return_path=rp(["angry@gamma.test"]))
    for wrap in (attached, inline):
        raw = _mixed(wrap(report))
        parsed = parse_arf(parse_message(raw))
        assert parsed is not None and parsed.original_rcpt_to == ["angry@gamma.test"], wrap.__name__
        (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
        assert (finding.kind, finding.account, finding.message_id) == ("complained", "acme", MESSAGE_ID)
        assert finding.recipient == "angry@gamma.test" and finding.suppresses


def test_a_forwarded_report_with_a_forged_token_changes_nothing() -> None:
    forged = rp(["angry@gamma.test"], secret="not-our-secret-at-all")
    raw = _mixed(attached(arf_report(to=FBL, recipient="angry@gamma.test", return_path=forged)))
    assert findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings == []


def test_a_forward_without_a_report_is_no_complaint() -> None:
    report = arf_report(to=FBL, recipient="angry@gamma.test", return_path=rp(["angry@gamma.test"]))
    plain = report.replace(b"report-type=feedback-report", b"report-type=something-else")
    assert parse_arf(parse_message(_mixed(attached(plain)))) is None
    assert all(
        f.kind != "complained"
        for f in findings(_mixed(attached(plain)), [FBL], CONFIG, DEFAULT_RULES).findings
    )


def test_a_report_buried_under_many_parts_is_not_searched_for() -> None:
    report = arf_report(to=FBL, recipient="angry@gamma.test", return_path=rp(["angry@gamma.test"]))
    filler = b"Content-Type: text/plain\r\n\r\nfiller\r\n"
    assert parse_arf(parse_message(_mixed(*[filler] * 20, attached(report)))) is None
