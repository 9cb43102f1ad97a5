"""DKIM over-signing of Sender: and Content-Transfer-Encoding: when present (rspamd's "(x)"
fields). A second Sender: makes mail readers show "evil on behalf of ..."; a second
Content-Transfer-Encoding: above the signed one makes readers decode the signed body as something
else. Neither may be added to a signed message without breaking its signature."""

from __future__ import annotations

import functools

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.router import dkim

MESSAGE = (
    b"From: Acme <news@acme.test>\r\n"
    b"Sender: mailer@acme.test\r\n"
    b"To: someone@example.test\r\n"
    b"Subject: Hello\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
    b"SGVsbG8gdGhlcmUu\r\n"
)


@functools.cache
def _pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _verify(data: bytes) -> bool:
    record = dkim.public_txt(_pem()).encode()
    return dkimpy.verify(data, dnsfunc=lambda name, timeout=5: record)


def _signed(message: bytes) -> bytes:
    key = dkim.SigningKey("acme.test", "s1", "rsa-sha256", dkim.private_key_material(_pem(), "rsa-sha256"))
    return dkim.sign(message, [key]).fields.encode() + message


@pytest.mark.parametrize("added", [b"Sender: Evil <evil@bad.test>", b"Content-Transfer-Encoding: base64"])
def test_a_second_field_added_above_the_signed_one_breaks_the_signature(added: bytes) -> None:
    signed = _signed(MESSAGE)
    assert _verify(signed)
    assert not _verify(added + b"\r\n" + signed), f"{added!r} slipped in at the top"


def test_when_absent_they_are_not_listed_so_a_list_may_add_them() -> None:
    bare = MESSAGE.replace(b"Sender: mailer@acme.test\r\n", b"").replace(
        b"Content-Transfer-Encoding: 7bit\r\n", b""
    )
    signed = _signed(bare)
    assert _verify(b"Sender: list-bounces@lists.test\r\n" + signed)
