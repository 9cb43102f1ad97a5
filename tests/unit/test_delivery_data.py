"""The DATA payload: byte for byte what aiosmtplib's `data()` would have sent."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from services.delivery.smtp_session import data_payload


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
    assert data_payload(body) == aiosmtplib_payload(body)


def test_payload_of_a_canonical_body_is_the_body_dot_stuffed() -> None:
    body = b"From: a@b.test\r\n\r\n" + b"line\r\n" * 1000 + b".hidden\r\n"
    assert data_payload(body) == body.replace(b"\r\n.hidden", b"\r\n..hidden") + b".\r\n"
