"""Security: what a stranger mails the inbound listener is read only so far. The stdlib parser
keeps an object per line and flufl.bounce runs 50-odd patterns over every line, so a message of
max_message_size made of short lines cost minutes of CPU and more memory than the pod has."""

from __future__ import annotations

from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.bounce.parse import parse_message
from tests.support.bounce_samples import postfix_dsn
from tests.unit.test_bounce_inbound import CONFIG, rp

HEAD = b"From: MAILER-DAEMON@mx.alpha.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"


def test_a_message_of_millions_of_empty_lines_is_read_only_so_far() -> None:
    # It took 20 s of CPU and more before (and ten times that for a message of 50 MB); the cost
    # is per line read, so the bound is on the lines, not on a clock (the benchmark's job).
    to = rp(["gone@alpha.test"])
    raw = HEAD + f"To: {to}\r\n\r\n".encode() + b"\r\n" * 3_000_000  # 6 MB
    assert str(parse_message(raw).get_payload()).count("\n") < 100_000
    assert findings(raw, [to], CONFIG, DEFAULT_RULES).findings == []


def test_only_the_first_lines_and_megabytes_are_parsed() -> None:
    many_lines = parse_message(HEAD + b"\r\n" + b"x\r\n" * 1_000_000)
    assert str(many_lines.get_payload()).count("\n") < 100_000
    long_lines = parse_message(HEAD + b"\r\n" + (b"y" * 60_000 + b"\r\n") * 400)
    assert len(str(long_lines.get_payload())) < 4 * 1024 * 1024


def test_the_report_after_a_line_of_megabytes_is_still_read() -> None:
    # Lines are cut one by one: the fields after an absurd one still count.
    to = rp(["gone@alpha.test"])
    raw = postfix_dsn(
        to=to, recipient="gone@alpha.test", diagnostic="550 5.1.1 User unknown " + "z" * 5_000_000
    )
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert (finding.recipient, finding.suppresses) == ("gone@alpha.test", True)


def test_a_report_returning_a_large_message_is_still_read() -> None:
    to = rp(["gone@alpha.test"])
    body = b"QUJD" * 19 + b"\r\n"
    raw = postfix_dsn(to=to, recipient="gone@alpha.test").replace(
        b"Subject: Hello\r\n\r\n", b"Subject: Hello\r\n\r\n" + body * 300_000, 1
    )
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert (finding.recipient, finding.suppresses) == ("gone@alpha.test", True)
