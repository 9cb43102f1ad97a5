"""Reports real MTAs send that the inbound parser misread: internationalised DSNs (RFC 6533, as
Postfix and Exim write them for SMTPUTF8 mail), addresses in raw UTF-8, and delay warnings in
prose."""

from __future__ import annotations

import base64

from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.bounce.parse import parse_bounce, parse_message
from services.core.config import BounceConfig
from services.core.returnpath import verp_address
from tests.support.bounce_samples import arf_report

DOMAIN = "bounces.relais.test"
SECRET = "0123456789abcdef0123"
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET])
MESSAGE_ID = "0192a3b4c5d6e7f8091a2b3"
FBL = f"fbl@{DOMAIN}"


def rp(recipients: list[str]) -> str:
    return verp_address(
        prefix="b", domain=DOMAIN, secret=SECRET, account="acme", message_id=MESSAGE_ID, recipients=recipients
    )


def postfix_smtputf8_dsn(*, to: str, recipient: str, action: str = "failed", status: str = "5.1.1") -> bytes:
    """What Postfix sends for mail it received with SMTPUTF8: a message/global-delivery-status
    part (RFC 6533) in 8bit, and the returned headers as message/global-headers."""
    diagnostic = (
        f"550 {status} <{recipient}>: Recipient address rejected: User unknown in virtual mailbox table"
        if status.startswith("5")
        else f"452 {status} <{recipient}>: Mailbox full"
    )
    return (
        "Return-Path: <>\r\n"
        "From: MAILER-DAEMON@mx.alpha.test (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="5B4C54275B.1572201717/mx.alpha.test"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        "--5B4C54275B.1572201717/mx.alpha.test\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "This is the mail system at host mx.alpha.test.\r\n"
        "\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n"
        "\r\n"
        "--5B4C54275B.1572201717/mx.alpha.test\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/global-delivery-status\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.alpha.test\r\n"
        "X-Postfix-Queue-ID: 5B4C54275B\r\n"
        "Arrival-Date: Sun, 27 Oct 2019 19:41:57 +0100 (CET)\r\n"
        "\r\n"
        f"Final-Recipient: utf-8; {recipient}\r\n"
        f"Original-Recipient: utf-8;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        "Remote-MTA: dns; mx2.alpha.test\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n"
        "--5B4C54275B.1572201717/mx.alpha.test\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: message/global-headers\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"Return-Path: <{to}>\r\n"
        "From: news@acme.test\r\n"
        f"To: {recipient}\r\n"
        "Subject: Grüße\r\n"
        "\r\n"
        "--5B4C54275B.1572201717/mx.alpha.test--\r\n"
    ).encode()


def test_an_internationalised_dsn_is_a_hard_bounce() -> None:
    to = rp(["gone@alpha.test"])
    raw = postfix_smtputf8_dsn(to=to, recipient="gone@alpha.test")
    parsed = parse_bounce(parse_message(raw))
    assert parsed.kind == "dsn" and parsed.reporting_mta == "mx.alpha.test"
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert (finding.kind, finding.recipient) == ("bounced", "gone@alpha.test")
    assert finding.category == "invalid_recipient"
    assert finding.permanent and finding.suppresses
    assert finding.reply is not None and finding.reply.enhanced_status == "5.1.1"


def test_an_internationalised_dsn_names_a_utf8_recipient_as_sent() -> None:
    recipient = "jürgen@bücher.test"
    to = rp([recipient])
    raw = postfix_smtputf8_dsn(to=to, recipient=recipient)
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.recipient == recipient and finding.suppresses


def test_an_internationalised_delay_notice_is_read_as_a_delay() -> None:
    to = rp(["slow@alpha.test"])
    raw = postfix_smtputf8_dsn(to=to, recipient="slow@alpha.test", action="delayed", status="4.2.2")
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert not finding.permanent and not finding.suppresses


def test_an_encoded_delivery_status_part_is_read() -> None:
    # RFC 6533: unlike message/delivery-status, the global one may be base64 or quoted-printable
    # (a hop without 8BITMIME on the way); Exim also writes the fields before Final-Recipient.
    to = rp(["gone@alpha.test"])
    fields = (
        b"Reporting-MTA: dns; mx.alpha.test\r\n"
        b"\r\n"
        b"Action: failed\r\n"
        b"Final-Recipient: rfc822;gone@alpha.test\r\n"
        b"Status: 5.1.1\r\n"
        b"Remote-MTA: dns; mx2.alpha.test\r\n"
        b"X-Remote-MTA-smtp-greeting: X-Str; 220 mx2.alpha.test ESMTP\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <gone@alpha.test>: No such user\r\n"
    )
    for kind in ("message/global-delivery-status", "message/delivery-status"):
        raw = (
            f"From: Mail Delivery System <Mailer-Daemon@mx.alpha.test>\r\nTo: {to}\r\n"
            "Subject: Mail delivery failed: returning message to sender\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="E"\r\n'
            "\r\n--E\r\nContent-type: text/plain; charset=us-ascii\r\n\r\n"
            "This message was created automatically by mail delivery software.\r\n"
            f"\r\n--E\r\nContent-type: {kind}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        raw += base64.encodebytes(fields).replace(b"\n", b"\r\n") + b"\r\n--E--\r\n"
        parsed = parse_bounce(parse_message(raw))
        assert parsed.kind == "dsn", kind
        (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
        assert finding.recipient == "gone@alpha.test" and finding.suppresses, kind


def test_raw_utf8_in_a_plain_delivery_status_is_read_as_utf8() -> None:
    # Not what RFC 6533 asks, but what an MTA without it writes for an SMTPUTF8 recipient.
    recipient = "jürgen@alpha.test"
    to = rp([recipient])
    raw = postfix_smtputf8_dsn(to=to, recipient=recipient).replace(
        b"message/global-delivery-status", b"message/delivery-status"
    )
    parsed = parse_bounce(parse_message(raw))
    assert [r.recipient for r in parsed.recipients] == [recipient]
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.recipient == recipient and finding.suppresses


def test_a_complaint_naming_a_utf8_recipient_in_raw_utf8() -> None:
    recipient = "jürgen@gamma.test"
    raw = arf_report(to=FBL, recipient=recipient, return_path=rp([recipient]))  # 8-bit as written
    assert recipient.encode() in raw
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert (finding.kind, finding.recipient) == ("complained", recipient)


EXIM_DELAY_WARNING = (
    "From: Mail Delivery System <Mailer-Daemon@mx.beta.test>\r\n"
    "To: {to}\r\n"
    "Subject: Warning: message 1abcDE-000123-XY delayed 24 hours\r\n"
    "Auto-Submitted: auto-replied\r\n"
    "\r\n"
    "This message was created automatically by mail delivery software.\r\n"
    "A message that you sent has not yet been delivered to one or more of its\r\n"
    "recipients after more than 24 hours on the queue on mx.beta.test.\r\n"
    "\r\n"
    "The message identifier is:     1abcDE-000123-XY\r\n"
    "The subject of the message is: Hello\r\n"
    "The date of the message is:    Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    "\r\n"
    "The address to which the message has not yet been delivered is:\r\n"
    "\r\n"
    "  {recipient}\r\n"
    "    host mx.beta.test [192.0.2.1]\r\n"
    "    Delay reason: SMTP error from remote mail server after RCPT TO:<{recipient}>:\r\n"
    "    {reason}\r\n"
    "\r\n"
    "No action is required on your part. Delivery attempts will continue for\r\n"
    "some time, and this warning may be repeated at intervals if the message\r\n"
    "remains undelivered. Eventually the mail delivery software will give up,\r\n"
    "and when that happens, the message will be returned to you.\r\n"
)


def test_a_delay_warning_in_prose_is_no_bounce() -> None:
    # Exim's warning without a delivery-status part: the message is still being retried, so it
    # is neither a `bounced` outcome nor a reason to suppress, whatever the delay reason says.
    to = rp(["slow@beta.test"])
    for reason in ("452 4.2.2 Mailbox full", "Unrouteable address"):
        raw = EXIM_DELAY_WARNING.format(to=to, recipient="slow@beta.test", reason=reason).encode()
        (recipient,) = parse_bounce(parse_message(raw)).recipients
        assert not recipient.permanent, reason
        (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
        assert not finding.permanent and not finding.suppresses, reason


def test_a_domain_token_vouches_for_no_name_longer_than_a_mailbox_can_have() -> None:
    # A complaint (or bounce) naming a megabyte-long address at the token's domain made an
    # event and a suppression entry of that size: more than NATS takes in one message.
    domain = rp(["one@gamma.test", "two@gamma.test"])
    longest = "x" * 64 + "@gamma.test"
    raw = arf_report(to=FBL, recipient=longest, return_path=domain)
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert finding.recipient == longest
    for name in ("x" * 65 + "@gamma.test", "x" * 1_000_000 + "@gamma.test"):
        raw = arf_report(to=FBL, recipient=name, return_path=domain)
        verdict = findings(raw, [FBL], CONFIG, DEFAULT_RULES)
        assert verdict.findings == [] and verdict.rejected
