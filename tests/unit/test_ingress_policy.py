"""Ingress policy verdicts: facts in, the exact reply out (no sockets)."""

from __future__ import annotations

import pytest

from services.core.config import AccountConfig, BounceConfig, Config, IngressConfig
from services.ingress import headers, policy
from services.ingress.data import LineStats, normalise_line_endings
from services.ingress.replies import (
    ACCOUNT_DISABLED,
    AUTH_REQUIRED,
    BAD_HELO,
    BAD_RECIPIENT_SYNTAX,
    BAD_SENDER_SYNTAX,
    BARE_LINE_ENDING,
    DUPLICATE_FIELD,
    FROM_NEEDS_SENDER,
    FROM_NOT_OWNED,
    HEADER_TOO_BIG,
    LINE_TOO_LONG,
    NEEDS_8BITMIME,
    NEEDS_SMTPUTF8,
    NUL_BYTES,
    POOL_NOT_ALLOWED,
    RELAY_DENIED,
    SENDER_HEADER_NOT_OWNED,
    SENDER_NOT_OWNED,
    TOO_MANY_HOPS,
    TOO_MANY_RECIPIENTS,
)

ACME = AccountConfig(password_hash="scrypt$x", domains=["acme.test", "news.acme.test"], pools=["bulk"])

# Classic open-relay tricks: every one must be refused as a relay attempt or bad syntax.
RELAY_TRICKS = [
    "user%victim.test@acme.test",
    "victim.test!user@acme.test",
    "@relay.test:user@victim.test",
    "@a.test,@b.test:user@victim.test",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    # An address without its brackets: no top-level domain is all digits (RFC 1123 2.1).
    "user@10.0.0.10",
    "user@127.0.0.10",
    "user@192.0.2.255",
    '"user@victim.test"@acme.test',
    '"user%victim.test"@acme.test',
    "user@victim.test@acme.test",
]


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_relay_tricks_refused_as_recipients(address: str) -> None:
    assert policy.recipient_verdict(address, 0, 100) in (RELAY_DENIED, BAD_RECIPIENT_SYNTAX)


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_relay_tricks_never_reach_local_domains(address: str) -> None:
    verdict = policy.inbound_recipient_verdict(address, 0, 100, ["acme.test"])
    assert verdict in (RELAY_DENIED, BAD_RECIPIENT_SYNTAX)


def test_domains_whose_top_label_has_digits_are_no_ip_address() -> None:
    for domain in ("x.b2b", "example.xn--p1ai", "10.example", "a.0com"):
        assert policy.split_address(f"user@{domain}") == ("user", domain), domain


def test_plain_recipient_accepted_and_counted() -> None:
    assert policy.recipient_verdict("someone@alpha.test", 0, 2) is None
    assert policy.recipient_verdict("someone@alpha.test", 2, 2) == TOO_MANY_RECIPIENTS


def test_inbound_only_local_domains() -> None:
    local = ["bounces.relais.test"]
    assert policy.inbound_recipient_verdict("b+acme.x@bounces.relais.test", 0, 10, local) is None
    assert policy.inbound_recipient_verdict("fbl@eu.bounces.relais.test", 0, 10, local) is None
    assert policy.inbound_recipient_verdict("someone@alpha.test", 0, 10, local) == RELAY_DENIED
    assert policy.inbound_recipient_verdict("x@evilbounces.relais.test", 0, 10, local) == RELAY_DENIED


def test_local_domains_include_return_path_domain() -> None:
    config = Config(
        ingress=IngressConfig(local_domains=["fbl.relais.test"]),
        bounce=BounceConfig(return_path_domain="rp.relais.test")
        if "return_path_domain" in BounceConfig.__dataclass_fields__
        else BounceConfig(),
    )
    domains = policy.local_domains(config)
    assert "fbl.relais.test" in domains


def test_sender_needs_account_and_ownership() -> None:
    assert policy.sender_verdict(None, "a@acme.test") == AUTH_REQUIRED
    assert policy.sender_verdict(ACME, "a@acme.test") is None
    assert policy.sender_verdict(ACME, "a@NEWS.acme.test") is None
    assert policy.sender_verdict(ACME, "") is None
    assert policy.sender_verdict(ACME, "a@other.test") == SENDER_NOT_OWNED
    assert policy.sender_verdict(ACME, "a%b@acme.test") == BAD_SENDER_SYNTAX
    disabled = AccountConfig(password_hash="scrypt$x", domains=["acme.test"], disabled=True)
    assert policy.sender_verdict(disabled, "a@acme.test") == ACCOUNT_DISABLED


def test_utf8_addresses_need_smtputf8() -> None:
    assert policy.sender_verdict(ACME, "jörg@acme.test") == NEEDS_SMTPUTF8
    assert policy.sender_verdict(ACME, "jörg@acme.test", smtputf8=True) is None
    assert policy.recipient_verdict("josé@alpha.test", 0, 10) == NEEDS_SMTPUTF8
    assert policy.recipient_verdict("josé@alpha.test", 0, 10, smtputf8=True) is None
    assert policy.recipient_verdict("josé@bücher.test", 0, 10, smtputf8=True) is None


def test_an_internationalised_sender_domain_is_read_by_idna_2008() -> None:
    """faß.test is xn--fa-hia.test, another registered domain than fass.test (what Python's own
    IDNA 2003 codec made of it): its owner may send as it, the owner of fass.test may not."""
    owns_fass = AccountConfig(password_hash="scrypt$x", domains=["fass.test"])
    owns_fass_eszett = AccountConfig(password_hash="scrypt$x", domains=["faß.test"])
    assert policy.sender_verdict(owns_fass, "ceo@faß.test", smtputf8=True) == SENDER_NOT_OWNED
    assert policy.sender_verdict(owns_fass_eszett, "ceo@faß.test", smtputf8=True) is None
    assert policy.sender_verdict(owns_fass_eszett, "ceo@xn--fa-hia.test") is None
    assert policy.split_address("ceo@Faß.test", utf8=True) == ("ceo", "xn--fa-hia.test")


def test_content_verdicts() -> None:
    ok = b"Subject: x\r\n\r\nbody\r\n"
    assert policy.content_verdict(ok, "reject") is None
    assert policy.content_verdict(b"Subject: x\r\n\r\nb\x00\r\n", "reject") == NUL_BYTES
    assert policy.content_verdict(b"Subject: x\r\n\r\nb\n.\nMAIL FROM:<x>\r\n", "reject") == BARE_LINE_ENDING
    assert policy.content_verdict(b"Subject: x\r\n\r\nb\r.\rx\r\n", "reject") == BARE_LINE_ENDING
    assert policy.content_verdict(b"Subject: x\r\n\r\nb\n.\r\n", "normalise") is None


def test_line_length_limit_is_998_octets() -> None:
    assert policy.content_verdict(b"S: x\r\n\r\n" + b"a" * 998 + b"\r\n", "reject") is None
    assert policy.content_verdict(b"S: x\r\n\r\n" + b"a" * 999 + b"\r\n", "reject") == LINE_TOO_LONG


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\nbody\r\n",
        b"Subject: x\r\n\r\nb\n.\nMAIL FROM:<x>\r\n",
        b"Subject: x\r\n\r\nb\r.\rx\r\n",
        b"Subject: x\r\n\r\nb\n.\r\n",
        b"S: x\r\n\r\n" + b"a" * 998 + b"\r\n",
        b"S: x\r\n\r\n" + b"a" * 999 + b"\r\n",
        b"S: x\r\n\r\n" + b"a" * 600 + b"\n" + b"a" * 600 + b"\r\n",  # long only as sent
        b"S: x\r\n\r\n\r\r\n\n\r\n",
    ],
)
@pytest.mark.parametrize("mode", ["reject", "normalise"])
def test_what_the_data_reader_saw_gives_the_same_verdicts(data: bytes, mode: str) -> None:
    seen = LineStats(longest=max(map(len, data.split(b"\r\n"))), crlf=data.count(b"\r\n"))
    assert policy.content_verdict(data, mode, lines=seen) == policy.content_verdict(data, mode)


def test_eight_bit_needs_declaration() -> None:
    data = "Subject: x\r\n\r\nGrüße\r\n".encode()
    assert policy.content_verdict(data, "reject", eight_bit_declared=False) == NEEDS_8BITMIME
    assert policy.content_verdict(data, "reject", eight_bit_declared=True) is None


def test_header_size_limit() -> None:
    data = b"X-Big: " + b"a" * 900 + b"\r\n" + b"X-More: y\r\n" * 20 + b"\r\nbody\r\n"
    assert policy.content_verdict(data, "reject", max_header_size=500) == HEADER_TOO_BIG
    assert policy.content_verdict(data, "reject", max_header_size=10_000) is None


def test_normalise_line_endings() -> None:
    assert normalise_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"


def test_from_header_ownership() -> None:
    owned = b"From: Acme <news@acme.test>\r\nSubject: x\r\n\r\nbody\r\n"
    folded = b"From: Acme\r\n <news@acme.test>\r\n\r\n"
    foreign = b"From: PayPal <service@paypal.test>\r\n\r\n"
    in_body = b"Subject: x\r\n\r\nFrom: <a@paypal.test>\r\n"
    assert policy.from_header_verdict(ACME, owned) is None
    assert policy.from_header_verdict(ACME, folded) is None
    assert policy.from_header_verdict(ACME, foreign) == FROM_NOT_OWNED
    assert policy.from_header_verdict(ACME, in_body) == FROM_NOT_OWNED


@pytest.mark.parametrize(
    "value",
    [
        # A comment splits the domain from the "@": a mail reader sees ceo@bank.example.
        "ceo@(x@acme.test)bank.example",
        "ceo@ bank.example (x@acme.test)",
        # A non-ASCII character ends a naive "@domain" scan early.
        "<ceo@acme.testévil.example>",
        "<ceo@bank.example>, <news@acme.test>",
        "no-address-at-all",
    ],
)
def test_from_header_read_as_a_mail_reader_reads_it(value: str) -> None:
    assert policy.from_header_verdict(ACME, f"From: {value}\r\n\r\n".encode()) == FROM_NOT_OWNED


def test_every_from_header_must_be_owned() -> None:
    second_from = b"From: <news@acme.test>\r\nFrom: CEO <ceo@bank.example>\r\n\r\n"
    assert policy.from_header_verdict(ACME, second_from) == FROM_NOT_OWNED
    commented = b"From: news@acme.test (Acme news)\r\n\r\n"
    assert policy.from_header_verdict(ACME, commented) is None
    assert policy.from_header_domains(b"From: Acme <news@acme.test>\r\n\r\n") == ["acme.test"]
    assert policy.from_header_domains(b"From: nobody\r\n\r\n") == [""]


def test_a_sender_header_must_be_owned_too() -> None:
    # Mail readers show Sender: as who sent "on behalf of" the From:.
    owned_from = b"From: Acme <news@acme.test>\r\n"
    assert policy.from_header_verdict(ACME, owned_from + b"Sender: <desk@acme.test>\r\n\r\n") is None
    foreign = (b"<ceo@bank.example>", b"ceo@(x@acme.test)bank.example", b"desk@acme.test, ceo@bank.example")
    for sender in foreign:
        block = owned_from + b"Sender: " + sender + b"\r\n\r\n"
        assert policy.from_header_verdict(ACME, block) == SENDER_HEADER_NOT_OWNED, sender
    # A foreign From: stays the first reason, whatever the Sender: says.
    foreign = b"From: <ceo@bank.example>\r\nSender: <desk@acme.test>\r\n\r\n"
    assert policy.from_header_verdict(ACME, foreign) == FROM_NOT_OWNED
    # An owned Sender: does not stand in for a missing From:.
    assert policy.from_header_verdict(ACME, b"Sender: <desk@acme.test>\r\n\r\n") == FROM_NOT_OWNED


def test_an_internationalised_from_domain_is_owned_in_either_spelling() -> None:
    account = AccountConfig(password_hash="scrypt$x", domains=["xn--bcher-kva.test"])
    assert policy.from_header_verdict(account, "From: <news@bücher.test>\r\n\r\n".encode()) is None
    assert policy.from_header_domains("From: <news@Bücher.test>\r\n\r\n".encode()) == ["xn--bcher-kva.test"]


@pytest.mark.parametrize("name", ["evil\rX-Injected: yes", "nul\x00.test", "\udcff\udcfe.test", "tab\there"])
def test_helo_names_that_would_break_the_received_header(name: str) -> None:
    assert policy.helo_verdict(name) == BAD_HELO


def test_ordinary_helo_names() -> None:
    for name in ("mail.example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]", "localhost", "odd name"):
        assert policy.helo_verdict(name) is None


def test_undecodable_octets_are_no_utf8_local_part() -> None:
    # surrogateescape's stand-ins for \xff: not a character the envelope can encode.
    assert policy.split_address("\udcff@alpha.test", utf8=True) is None
    assert policy.split_address("jürgen@alpha.test", utf8=True) == ("jürgen", "alpha.test")


def test_pool_selection_only_for_allowed_pools() -> None:
    pools = ["default", "bulk", "transactional"]
    assert policy.pool_verdict("bulk", ACME, pools) is None
    assert policy.pool_verdict("default", ACME, pools) is None
    assert policy.pool_verdict("transactional", ACME, pools) == POOL_NOT_ALLOWED
    assert policy.pool_verdict("bulk", ACME, ["default"]) == POOL_NOT_ALLOWED


def test_control_values_are_token_safe() -> None:
    assert policy.control_value(" spring-sale_2026 ") == "spring-sale_2026"
    assert policy.control_value("a b") == ""
    assert policy.control_value("x" * 65) == ""
    assert policy.control_value(None) == ""


def test_relay_networks() -> None:
    assert policy.in_networks("10.1.2.3", ["10.0.0.0/8"])
    assert not policy.in_networks("192.0.2.1", ["10.0.0.0/8"])
    assert not policy.in_networks("garbage", ["10.0.0.0/8"])


def _with_received(n: int, body: bytes = b"Hi.\r\n") -> bytes:
    trace = b"".join(
        b"Received: from h%d\r\n\tby relais.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n" % i for i in range(n)
    )
    return trace + b"From: a@acme.test\r\nSubject: x\r\n\r\n" + body


def test_a_message_with_max_hops_received_fields_is_a_loop() -> None:
    assert policy.hop_verdict(headers.split_message(_with_received(policy.MAX_HOPS - 1))[0]) is None
    assert policy.hop_verdict(headers.split_message(_with_received(policy.MAX_HOPS))[0]) == TOO_MANY_HOPS


def test_received_lines_in_the_body_are_not_hops() -> None:
    report = b"".join(b"Received: from h%d by x\r\n" % i for i in range(2 * policy.MAX_HOPS))
    assert policy.hop_verdict(headers.split_message(_with_received(1, body=report))[0]) is None


def _fields_verdict(data: bytes) -> object:
    return policy.header_fields_verdict(headers.HeaderBlock(headers.split_message(data)[0]))


@pytest.mark.parametrize("name", headers.SINGLE_FIELDS)
def test_a_field_rfc_5322_allows_once_given_twice(name: str) -> None:
    once = b"From: <news@acme.test>\r\n" + (b"" if name == "From" else f"{name}: x\r\n".encode())
    assert _fields_verdict(once + b"Subject2: y\r\n\r\nbody\r\n") is None
    # Names are case-insensitive; `Name :` is the same field (RFC 5322 obs-optional).
    for second in (name.upper(), name.lower(), name + " "):
        data = once + b"X-Other: y\r\n" + f"{second}: x\r\n".encode() + b"\r\nbody\r\n"
        assert _fields_verdict(data) == DUPLICATE_FIELD[name.lower()], second


def test_fields_that_may_repeat_and_fields_past_the_header() -> None:
    trace = b"Received: from a by b; Tue, 1 Dec 2026 10:00:00 +0000\r\n" * 3
    repeatable = trace + b"Comments: a\r\nComments: b\r\nBcc: a@x.test\r\nBcc: b@x.test\r\n"
    assert _fields_verdict(repeatable + b"From: <a@acme.test>\r\n\r\n") is None
    # The header ends at a line that is no field: what follows is body, for readers too.
    assert _fields_verdict(b"From: <a@acme.test>\r\nnot a field\r\nFrom: <b@x.test>\r\n\r\n") is None
    assert _fields_verdict(b"From: <a@acme.test>\r\n\r\nFrom: <b@x.test>\r\n") is None
    # The first repeated field of the table is the one named.
    both = b"Subject: a\r\nFrom: <a@acme.test>\r\nFrom: <b@acme.test>\r\nSubject: b\r\n\r\n"
    assert _fields_verdict(both) == DUPLICATE_FIELD["from"]


@pytest.mark.parametrize(
    "value",
    [b"a@acme.test, b@acme.test", b"A <a@acme.test>,\r\n\tB <b@acme.test>", b"G: a@acme.test, b@acme.test;"],
)
def test_a_from_of_several_mailboxes_needs_a_sender(value: bytes) -> None:
    assert _fields_verdict(b"From: " + value + b"\r\n\r\n") == FROM_NEEDS_SENDER
    assert _fields_verdict(b"From: " + value + b"\r\nSENDER: <a@acme.test>\r\n\r\n") is None


@pytest.mark.parametrize(
    "value",
    [
        b'"Acme, News" <news@acme.test>',
        b"news@acme.test (Acme, News)",
        b"=?utf-8?q?Acme,_News?= <n@acme.test>",
    ],
)
def test_one_mailbox_with_a_comma_needs_no_sender(value: bytes) -> None:
    assert _fields_verdict(b"From: " + value + b"\r\n\r\n") is None
