"""DKIM for header fields written with white space before the colon ("Subject : Hi", RFC 5322
obs-optional). The ingress accepts them and reads "From : x" as a From: field; the signature must
cover them as such. Relaxed canonicalisation (RFC 6376 3.4.2) deletes that white space, so a
signature over the field without it is the signature of the field as sent.

dkimpy cannot parse such a header (it refuses "Subject :" and skips any line starting "From "),
so the signature is checked with the small relaxed/relaxed verifier below, written from RFC 6376
3.4.2, 3.4.4 and 3.7 alone."""

from __future__ import annotations

import base64
import functools
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.router import dkim

_WSP_RUN = re.compile(rb"[ \t]+")


def _fields(message: bytes) -> tuple[list[bytes], bytes]:
    head, sep, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body if sep else b""


def _name(field: bytes) -> bytes:
    return field.partition(b":")[0].strip(b" \t").lower()


def _relaxed_field(field: bytes) -> bytes:
    value = _WSP_RUN.sub(b" ", field.partition(b":")[2].replace(b"\r\n", b"")).strip(b" ")
    return _name(field) + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    lines = [_WSP_RUN.sub(b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def _tags(field: bytes) -> dict[bytes, bytes]:
    value = re.sub(rb"\s+", b"", field.partition(b":")[2])
    return dict(tag.split(b"=", 1) for tag in value.split(b";") if tag)


def relaxed_verify(message: bytes, public: rsa.RSAPublicKey) -> bool:
    """Whether the first DKIM-Signature (rsa-sha256, relaxed/relaxed) verifies."""
    fields, body = _fields(message)
    signature = next(f for f in fields if _name(f) == b"dkim-signature")
    tags = _tags(signature)
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"a"] == b"rsa-sha256"
    if base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()) != tags[b"bh"]:
        return False
    signed, taken = b"", dict[bytes, int]()
    for name in tags[b"h"].lower().split(b":"):
        instances = [f for f in fields if _name(f) == name]
        taken[name] = taken.get(name, 0) + 1
        if taken[name] <= len(instances):  # bottom-up, one instance per listing
            signed += _relaxed_field(instances[-taken[name]]) + b"\r\n"
    signed += re.sub(rb"(;\s*b=)[^;]*$", rb"\1", _relaxed_field(signature))
    try:
        public.verify(base64.b64decode(tags[b"b"]), signed, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


@functools.cache
def _private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(message: bytes) -> bytes:
    pem = _private().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = dkim.SigningKey("acme.test", "s1", "rsa-sha256", dkim.private_key_material(pem, "rsa-sha256"))
    return dkim.sign(message, [key]).fields.encode() + message


PLAIN = b"From: Acme <news@acme.test>\r\nTo: x@example.test\r\nSubject: Hi\r\n\r\nHello.\r\n"


def test_the_verifier_here_accepts_a_good_signature_and_refuses_a_changed_one() -> None:
    signed = _sign(PLAIN)
    assert relaxed_verify(signed, _private().public_key())
    assert not relaxed_verify(signed.replace(b"Subject: Hi", b"Subject: Ho"), _private().public_key())
    assert not relaxed_verify(signed.replace(b"Hello.", b"Hullo."), _private().public_key())


@pytest.mark.parametrize(
    "message",
    [
        PLAIN.replace(b"Subject: Hi", b"Subject : Hi"),
        PLAIN.replace(b"To: x", b"To\t: x"),
        PLAIN.replace(b"From: Acme", b"From : Acme"),
    ],
)
def test_a_field_with_white_space_before_its_colon_is_signed_as_sent(message: bytes) -> None:
    signed = _sign(message)
    public = _private().public_key()
    assert relaxed_verify(signed, public)
    changed = re.sub(rb"(?m)^(Subject|To|From)([ \t]*):", rb"\1\2: changed", message, count=3)
    assert not relaxed_verify(signed.replace(message, changed), public), "the fields are covered"


def test_a_body_line_that_looks_like_such_a_field_is_not_touched() -> None:
    message = PLAIN.replace(b"Hello.", b"Note : this is the body")
    assert relaxed_verify(_sign(message), _private().public_key())
    assert relaxed_verify(_sign(b"\r\nNote : a message with no header\r\n"), _private().public_key())


def test_the_key_is_chosen_by_such_a_from_field_as_by_any_other() -> None:
    brand = [dkim.SigningKey("brand.test", "s", "rsa-sha256", b"")]
    acme = [dkim.SigningKey("acme.test", "s", "rsa-sha256", b"")]
    message = PLAIN.replace(b"From: Acme <news@acme.test>", b"From : Brand <news@brand.test>")
    assert dkim.from_domains(message) == ["brand.test"]
    keys = {"brand.test": brand, "acme.test": acme}
    assert dkim.signing_keys(keys, message, "acme.test", ["acme.test", "brand.test"]) == brand
