"""DKIM signing: header choice, over-signing, key formats, and signatures dkimpy verifies."""

from __future__ import annotations

import base64
import functools

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.router import dkim

MESSAGE = (
    b"Received: from client ([127.0.0.1])\r\n\tby relais.test\r\n"
    b"From: Acme <news@acme.test>\r\n"
    b"To: someone@example.test\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@acme.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Hello there.\r\n"
)


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@functools.cache
def rsa_pem() -> bytes:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@functools.cache
def ed_pem() -> bytes:
    return _pem(ed25519.Ed25519PrivateKey.generate())


def _key(algorithm: str, pem: bytes, selector: str = "s1") -> dkim.SigningKey:
    return dkim.SigningKey("acme.test", selector, algorithm, dkim.private_key_material(pem, algorithm))


def _dns(records: dict[str, str]):
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value else None

    return lookup


def test_present_fields_are_signed_once_per_occurrence_and_over_signed_ones_once_more() -> None:
    present = dkim.header_names(MESSAGE)
    signed = dkim.headers_to_sign(present, dkim.DEFAULT_HEADERS)
    assert signed.count("from") == 2 and signed.count("subject") == 2 and signed.count("date") == 2
    assert signed.count("to") == 2 and signed.count("content-type") == 2 and "received" not in signed
    # An absent over-signed field is listed once: it must stay absent.
    assert signed.count("cc") == 1 and signed.count("reply-to") == 1
    assert "sender" not in signed, "absent fields that are not over-signed are not listed"
    assert dkim.headers_to_sign(["to", "to"], ["to"]) == ["to", "to", "to"]
    assert dkim.headers_to_sign(["feedback-id"], ["feedback-id"]) == ["feedback-id"]


@pytest.mark.parametrize("algorithm,pem", [("rsa-sha256", rsa_pem), ("ed25519-sha256", ed_pem)])
def test_signature_verifies_and_breaks_when_a_from_is_added(algorithm: str, pem) -> None:
    key = _key(algorithm, pem())
    field = dkim.sign(MESSAGE, [key]).fields
    assert field.startswith("DKIM-Signature: ") and field.endswith("\r\n")
    assert f"a={algorithm}" in field
    signed = field.encode() + MESSAGE
    records = {"s1._domainkey.acme.test": dkim.public_txt(pem())}
    assert dkimpy.verify(signed, dnsfunc=_dns(records))
    # Over-signing: a second From: added after signing invalidates the signature.
    tampered = signed.replace(b"From: Acme", b"From: Evil <evil@bad.test>\r\nFrom: Acme", 1)
    assert not dkimpy.verify(tampered, dnsfunc=_dns(records))


def _sign_and_verifier(message: bytes):
    key = _key("rsa-sha256", rsa_pem())
    signed = dkim.sign(message, [key]).fields.encode() + message
    records = {"s1._domainkey.acme.test": dkim.public_txt(rsa_pem())}
    return signed, lambda data: dkimpy.verify(data, dnsfunc=_dns(records))


REPLY = MESSAGE.replace(
    b"MIME-Version", b"In-Reply-To: <0@acme.test>\r\nReferences: <0@acme.test>\r\nMIME-Version"
)


@pytest.mark.parametrize(
    "added",
    [
        b"Reply-To: Evil <evil@bad.test>",
        b"Cc: evil@bad.test",
        b"To: evil@bad.test",
        b"Message-ID: <2@bad.test>",
        b"Content-Type: text/html",
        b"MIME-Version: 1.0",
        b"In-Reply-To: <9@bad.test>",
        b"References: <9@bad.test>",
    ],
)
def test_adding_an_over_signed_field_after_signing_breaks_the_signature(added: bytes) -> None:
    # Reply-To and Cc are absent from the message (over-signed all the same); the others are
    # present once (over-signed because they are).
    signed, verify = _sign_and_verifier(REPLY)
    assert verify(signed)
    head, _, body = signed.partition(b"\r\n\r\n")
    # At the end of the header (where a field signed once is looked for) or at the top (where
    # only over-signing catches a second To, Message-ID or Content-Type).
    assert not verify(head + b"\r\n" + added + b"\r\n\r\n" + body), f"{added!r} slipped in at the end"
    assert not verify(added + b"\r\n" + signed), f"{added!r} slipped in at the top"


@pytest.mark.parametrize(
    "message",
    [
        b"From: news@acme.test\r\n\r\nHello.\r\n",
        b"From: news@acme.test\r\nList-Unsubscribe: <mailto:u@acme.test>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nCc: a@x.test, b@y.test\r\n\r\nHi.\r\n",
        MESSAGE,
    ],
)
def test_a_message_lacking_over_signed_fields_still_verifies(message: bytes) -> None:
    signed, verify = _sign_and_verifier(message)
    assert verify(signed)


@pytest.mark.parametrize(
    "added",
    [
        b"List-Unsubscribe: <https://lists.test/u>",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        b"List-Id: <news.lists.test>",
        b"In-Reply-To: <0@lists.test>",
    ],
)
def test_a_field_a_mailing_list_adds_keeps_the_signature(added: bytes) -> None:
    # Mailman adds List-Unsubscribe (and may add List-Id): a message signed without them must
    # still verify after the list, or DMARC fails at every subscriber. So only fields present at
    # signing, and the reader-facing ones, are over-signed.
    signed, verify = _sign_and_verifier(MESSAGE)
    assert verify(added + b"\r\n" + signed)


def test_two_keys_give_two_independent_signatures() -> None:
    keys = [_key("rsa-sha256", rsa_pem(), "r1"), _key("ed25519-sha256", ed_pem(), "e1")]
    signed = dkim.sign(MESSAGE, keys).fields.encode() + MESSAGE
    records = {
        "r1._domainkey.acme.test": dkim.public_txt(rsa_pem()),
        "e1._domainkey.acme.test": dkim.public_txt(ed_pem()),
    }
    verifier = dkimpy.DKIM(signed)
    assert verifier.verify(0, dnsfunc=_dns(records))
    assert verifier.verify(1, dnsfunc=_dns(records))


def test_ed25519_keys_load_from_pem_or_a_base64_seed() -> None:
    from_pem = dkim.private_key_material(ed_pem(), "ed25519-sha256")
    assert len(base64.b64decode(from_pem)) == 32
    assert dkim.private_key_material(from_pem, "ed25519-sha256") == from_pem
    with pytest.raises(ValueError):
        dkim.private_key_material(rsa_pem(), "ed25519-sha256")
    with pytest.raises(ValueError):
        dkim.private_key_material(ed_pem(), "rsa-sha256")


def test_keys_of_the_from_domain_when_the_account_owns_it_else_the_sender_domain() -> None:
    acme = [_key("rsa-sha256", rsa_pem())]
    brand = [dkim.SigningKey("brand.test", "s", "rsa-sha256", b"")]
    keys = {"acme.test": acme, "brand.test": brand}
    msg = MESSAGE.replace(b"news@acme.test", b"news@brand.test")
    assert dkim.signing_keys(keys, msg, "acme.test", ["acme.test", "brand.test"]) == brand
    assert dkim.signing_keys(keys, msg, "acme.test", ["acme.test"]) == acme, "brand.test is not the account's"
    assert dkim.signing_keys(keys, MESSAGE, "other.test", []) == []


def test_keys_of_an_internationalised_domain_are_found_in_either_spelling() -> None:
    intl = [dkim.SigningKey("xn--bcher-kva.test", "s", "rsa-sha256", b"")]
    keys = {"xn--bcher-kva.test": intl}
    assert dkim.may_sign(keys, "bücher.test", [])
    assert dkim.signing_keys(keys, MESSAGE, "bücher.test", ["Bücher.test"]) == intl
    assert dkim.signing_keys(keys, MESSAGE, "xn--bcher-kva.test", ["bücher.test"]) == intl


def test_a_sender_owning_no_keyed_domain_is_known_unsigned_without_reading_the_body() -> None:
    keys = {"acme.test": [_key("rsa-sha256", rsa_pem())]}
    assert dkim.may_sign(keys, "ACME.test", [])
    assert dkim.may_sign(keys, "other.test", ["acme.test"])
    assert not dkim.may_sign(keys, "other.test", ["brand.test"])
    assert not dkim.may_sign({}, "acme.test", ["acme.test"])
    # Whenever may_sign says no, signing_keys finds nothing whatever the From: says.
    assert dkim.signing_keys(keys, MESSAGE, "other.test", ["brand.test"]) == []


@pytest.mark.parametrize(
    "message",
    [
        b"not a header line\r\n\r\nbody\r\n",
        # dkimpy raises IndexError, not a DKIMException, on a first line that is a continuation.
        b" folded: x\r\nFrom: news@acme.test\r\n\r\nbody\r\n",
        b"\tx\r\nFrom: news@acme.test\r\n\r\nbody\r\n",
    ],
)
def test_an_unparseable_message_raises_a_signing_error(message: bytes) -> None:
    with pytest.raises(dkim.SigningError) as caught:
        dkim.sign(message, [_key("ed25519-sha256", ed_pem())])
    assert caught.value.reason == dkim.REASON_MESSAGE


def test_a_refused_key_or_header_list_raises_a_signing_error_with_its_reason() -> None:
    bad_key = dkim.SigningKey("acme.test", "s1", "rsa-sha256", b"not a key")
    with pytest.raises(dkim.SigningError) as caught:
        dkim.sign(MESSAGE, [bad_key])
    assert caught.value.reason == dkim.REASON_KEY
    no_from = dkim.SigningKey("acme.test", "s1", "rsa-sha256", rsa_pem(), headers=("subject",))
    with pytest.raises(dkim.SigningError) as caught:
        dkim.sign(MESSAGE, [no_from])
    assert caught.value.reason == dkim.REASON_PARAMETER
    assert {dkim.REASON_KEY, dkim.REASON_MESSAGE, dkim.REASON_PARAMETER} <= set(dkim.REASONS)


@pytest.mark.parametrize("algorithm,pem", [("rsa-sha256", rsa_pem), ("ed25519-sha256", ed_pem)])
def test_dns_record_of_a_loaded_key_publishes_its_public_half(algorithm: str, pem) -> None:
    name, txt = dkim.dns_record(_key(algorithm, pem(), selector="sel"))
    assert name == "sel._domainkey.acme.test"
    assert txt == dkim.public_txt(pem())


def test_a_key_that_fails_costs_only_its_own_signature() -> None:
    # A domain rotating selectors signs with two keys: DMARC passes on either, so one refused
    # key must not send the message out with no signature at all.
    good = _key("ed25519-sha256", ed_pem(), "e1")
    bad = dkim.SigningKey("acme.test", "old", "rsa-sha256", b"not a key")
    signed = dkim.sign(MESSAGE, [bad, good])
    assert [f.reason for f in signed.failures] == [dkim.REASON_KEY]
    assert signed.fields.count("DKIM-Signature: ") == 1
    records = {"e1._domainkey.acme.test": dkim.public_txt(ed_pem())}
    assert dkimpy.verify(signed.fields.encode() + MESSAGE, dnsfunc=_dns(records))
