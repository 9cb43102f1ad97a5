"""The DATA payload: byte for byte what aiosmtplib's `data()` would have sent, and the size MAIL
declares for it (RFC 1870: without the doubled dots and the final dot line)."""

from __future__ import annotations

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from services.delivery.message_data import message_data, size_limit


def aiosmtplib_payload(body: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"Subject: x\r\n\r\nhello\r\n",
        b"Subject: x\r\n\r\nno final line end",
        b".starts with a dot\r\n.and another\r\n..two\r\n",
        b"Subject: x\r\n\r\n.\r\n",
        b"bare\nline\nends\n.dot after bare LF\n",
        b"bare\rCR\r.dot after bare CR",
        b"mixed\r\n\n\r\r\n.\r\n",
        b"\r\n.\r\n.\r\n",
        b"x" * 5000 + b"\r\n." + b"y" * 3000,
    ],
)
def test_payload_matches_aiosmtplib(body: bytes) -> None:
    data = message_data(body)
    assert data.wire == aiosmtplib_payload(body)
    assert data.size == len(normalize_message_line_endings(body)), "the size counts no stuffing dot"


def test_payload_of_a_canonical_body_is_the_body_dot_stuffed() -> None:
    body = b"From: a@b.test\r\n\r\n" + b"line\r\n" * 1000 + b".hidden\r\n"
    data = message_data(body)
    assert data.wire == body.replace(b"\r\n.hidden", b"\r\n..hidden") + b".\r\n"
    assert data.size == len(body)


@pytest.mark.parametrize(
    ("ehlo", "limit"),
    [
        ("mx.test\nPIPELINING", None),  # no SIZE: nothing declared, nothing refused
        ("mx.test\nSIZE", 0),  # SIZE without a limit (RFC 1870 4: none is announced)
        ("mx.test\nSIZE 0", 0),  # 0: no fixed limit
        ("mx.test\nSIZE 10240000\n8BITMIME", 10240000),
        ("mx.test\nSIZE lots", 0),  # malformed: Postfix ignores it (and warns)
        # Digits to str.isdigit() but not to int(), and more digits than int() takes: raised,
        # these sent the job back to the queue for ever.
        ("mx.test\nSIZE \u00b2", 0),
        ("mx.test\nSIZE \u0661\u0662", 0),
        ("mx.test\nSIZE " + "9" * 5000, 0),
    ],
)
def test_size_limit_as_the_ehlo_reply_gives_it(ehlo: str, limit: int | None) -> None:
    smtp = aiosmtplib.SMTP()
    smtp.last_ehlo_response = aiosmtplib.SMTPResponse(250, ehlo)  # parsed as aiosmtplib parses it
    assert size_limit(smtp) == limit
