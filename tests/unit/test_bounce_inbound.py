"""Inbound reports to the return path: only what the VERP token vouches for counts."""

from __future__ import annotations

import pytest

from services.bounce.arf import parse_arf
from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings, return_paths
from services.bounce.parse import parse_bounce, parse_message
from services.core.config import BounceConfig
from services.core.returnpath import verp_address
from tests.support.bounce_samples import arf_report, exim_bounce, postfix_dsn

DOMAIN = "bounces.relais.test"
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=["0123456789abcdef0123"])
MESSAGE_ID = "0192a3b4c5d6e7f8091a2b3"
FBL = f"fbl@{DOMAIN}"


def rp(recipients: list[str], secret: str = CONFIG.verp_secrets[0]) -> str:
    return verp_address(
        prefix="b", domain=DOMAIN, secret=secret, account="acme", message_id=MESSAGE_ID, recipients=recipients
    )


def test_postfix_dsn_to_a_valid_return_path_is_a_hard_bounce_of_that_recipient() -> None:
    to = rp(["gone@alpha.test"])
    verdict = findings(postfix_dsn(to=to, recipient="gone@alpha.test"), [to], CONFIG, DEFAULT_RULES)
    (finding,) = verdict.findings
    assert (finding.kind, finding.account, finding.message_id) == ("bounced", "acme", MESSAGE_ID)
    assert finding.recipient == "gone@alpha.test"
    assert finding.category == "invalid_recipient" and finding.suppresses
    assert finding.reply is not None and (finding.reply.code, finding.reply.enhanced_status) == (550, "5.1.1")
    assert finding.detail["format"] == "dsn" and finding.detail["reporting_mta"] == "mx.alpha.test"


def test_quota_bounce_is_recorded_but_does_not_suppress() -> None:
    to = rp(["full@alpha.test"])
    raw = postfix_dsn(to=to, recipient="full@alpha.test", status="5.2.2", diagnostic="552 5.2.2 Mailbox full")
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.category == "quota_issues" and not finding.suppresses


def test_exim_prose_bounce_is_read_through_the_heuristics() -> None:
    to = rp(["nobody@beta.test"])
    (finding,) = findings(
        exim_bounce(to=to, recipient="nobody@beta.test"), [to], CONFIG, DEFAULT_RULES
    ).findings
    assert finding.recipient == "nobody@beta.test" and finding.category == "invalid_recipient"
    assert finding.detail["format"] == "heuristic"


def test_forged_token_changes_nothing() -> None:
    forged = rp(["victim@alpha.test"], secret="not-our-secret-at-all")
    verdict = findings(postfix_dsn(to=forged, recipient="victim@alpha.test"), [forged], CONFIG, DEFAULT_RULES)
    assert verdict.findings == []
    assert verdict.rejected


def test_a_real_token_cannot_be_reused_for_another_address() -> None:
    # A recipient who saw their own Return-Path forges a bounce naming someone else.
    mine = rp(["insider@alpha.test"])
    verdict = findings(postfix_dsn(to=mine, recipient="victim@alpha.test"), [mine], CONFIG, DEFAULT_RULES)
    assert verdict.findings == []
    assert any("victim@alpha.test" in r for r in verdict.rejected)


def test_a_bounce_to_a_plain_local_address_changes_nothing() -> None:
    to = f"postmaster@{DOMAIN}"
    verdict = findings(postfix_dsn(to=to, recipient="gone@alpha.test"), [to], CONFIG, DEFAULT_RULES)
    assert verdict.findings == [] and verdict.rejected


def test_arf_report_to_the_feedback_address_is_a_complaint_via_the_returned_return_path() -> None:
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=rp(["angry@gamma.test"]))
    report = parse_arf(parse_message(raw))
    assert (
        report is not None
        and report.feedback_type == "abuse"
        and report.original_rcpt_to == ["angry@gamma.test"]
    )
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert (finding.kind, finding.account, finding.message_id) == ("complained", "acme", MESSAGE_ID)
    assert finding.recipient == "angry@gamma.test" and finding.suppresses
    assert finding.detail["feedback_type"] == "abuse"


def test_arf_with_a_forged_return_path_or_not_spam_changes_nothing() -> None:
    forged = rp(["angry@gamma.test"], secret="not-our-secret-at-all")
    assert (
        findings(
            arf_report(to=FBL, recipient="angry@gamma.test", return_path=forged), [FBL], CONFIG, DEFAULT_RULES
        ).findings
        == []
    )
    good = rp(["angry@gamma.test"])
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=good, feedback_type="not-spam")
    assert findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings == []


def test_parse_bounce_keeps_the_returned_headers() -> None:
    parsed = parse_bounce(parse_message(postfix_dsn(to="x@y.test", recipient="gone@alpha.test")))
    assert parsed.kind == "dsn" and parsed.original is not None and parsed.original["Subject"] == "Hello"


def redacted(raw: bytes, to_header: str) -> bytes:
    """The report without Original-Rcpt-To, and the reported message addressed to `to_header`."""
    head, sep, original = raw.partition(b"Content-Type: message/rfc822")
    lines = head.splitlines(keepends=True)
    head = b"".join(line for line in lines if not line.startswith(b"Original-Rcpt-To"))
    original = b"".join(
        (b"To: " + to_header.encode() + b"\r\n") if line.startswith(b"To:") else line
        for line in original.splitlines(keepends=True)
    )
    return head + sep + original


def test_a_redacted_complaint_counts_only_with_a_one_recipient_token() -> None:
    colleagues = "alice@gamma.test, bob@gamma.test, carol@gamma.test"
    one = rp(["alice@gamma.test"])
    raw = redacted(arf_report(to=FBL, recipient="alice@gamma.test", return_path=one), "alice@gamma.test")
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert finding.recipient == "alice@gamma.test"
    # A token for the recipient domain (one transaction to several colleagues) cannot say which
    # of them complained: none is suppressed, rather than all of them.
    domain = rp(["alice@gamma.test", "bob@gamma.test", "carol@gamma.test"])
    raw = redacted(arf_report(to=FBL, recipient="alice@gamma.test", return_path=domain), colleagues)
    verdict = findings(raw, [FBL], CONFIG, DEFAULT_RULES)
    assert verdict.findings == [] and verdict.rejected


@pytest.mark.parametrize("address", ["52.101.41.210", "2001:db8:1::250", "IPv6:2001:db8::421"])
def test_a_host_address_in_the_prose_is_not_taken_for_the_reply(address: str) -> None:
    to = rp(["nobody@beta.test"])
    raw = exim_bounce(to=to, recipient="nobody@beta.test").replace(
        b"    SMTP error", f"    host d123.ess.barracudanetworks.com [{address}]\r\n    SMTP error".encode()
    )
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.category == "invalid_recipient" and finding.suppresses
    assert finding.reply is not None and finding.reply.code == 550


def test_hostile_reports_cost_little() -> None:
    # One 64 KB header value without a separator, and a reported message stuffed with tokens:
    # the address scan is linear, and only the first few tokens are checked.
    huge = "x" * 65_536
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=huge)
    assert findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings == []
    tokens = [
        verp_address(
            prefix="b",
            domain=DOMAIN,
            secret="not-ours-at-all-0000",
            account="acme",
            message_id=MESSAGE_ID[:-3] + f"{i:03d}",
            recipients=["angry@gamma.test"],
        )
        for i in range(200)
    ]
    assert len(return_paths(tokens, CONFIG)) == 8
