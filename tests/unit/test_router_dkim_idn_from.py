"""DKIM key choice for an internationalised From: domain written in UTF-8 (RFC 6532, sent with
SMTPUTF8): the From: domain's key is used, as for any other From: domain (DMARC alignment)."""

from __future__ import annotations

from services.router import dkim

INTL = dkim.SigningKey("xn--bcher-kva.test", "s", "rsa-sha256", b"")
ACME = dkim.SigningKey("acme.test", "s", "rsa-sha256", b"")
UTF8_FROM = "From: Bücher <news@bücher.test>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()


def test_a_utf8_from_domain_is_found_in_the_header() -> None:
    assert dkim.from_domains(UTF8_FROM) == ["xn--bcher-kva.test"]


def test_the_utf8_from_domain_s_key_signs_when_the_account_owns_it() -> None:
    keys = {"xn--bcher-kva.test": [INTL], "acme.test": [ACME]}
    owned = ["acme.test", "bücher.test"]
    assert dkim.signing_keys(keys, UTF8_FROM, "acme.test", owned) == [INTL]
    # The envelope sender's domain has no key: the message is signed all the same.
    assert dkim.signing_keys({"xn--bcher-kva.test": [INTL]}, UTF8_FROM, "acme.test", owned) == [INTL]


def test_a_utf8_from_domain_the_account_does_not_own_is_not_signed_for() -> None:
    keys = {"xn--bcher-kva.test": [INTL], "acme.test": [ACME]}
    assert dkim.signing_keys(keys, UTF8_FROM, "acme.test", ["acme.test"]) == [ACME]
