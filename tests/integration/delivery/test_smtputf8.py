"""Internationalised mail through the whole pipeline: a non-ASCII recipient goes out with
SMTPUTF8 and an 8-bit body with BODY=8BITMIME; an MX without SMTPUTF8 bounces it (5.6.7)."""

from __future__ import annotations

import pytest

from services.delivery.smtp_session import SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.relais import asubmit, message, wait_for_events

UTF8_RCPT = "jöran@alpha.test"
EIGHT_BIT = message(subject="Grüße", body="Schöne Grüße aus Köln.\r\n")


def without_size(options: list[str]) -> list[str]:
    """The MAIL parameters but SIZE= (the sinks offer SIZE; test_size_extension is about it)."""
    return [o for o in options if not o.startswith("SIZE=")]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
async def test_non_ascii_recipient_and_8bit_body_are_carried(make_stack, make_sink, pki, tls: bool) -> None:
    # STARTTLS makes the client forget the extensions offered in plaintext (RFC 3207): unless it
    # asks again, SMTPUTF8 looks unsupported and the recipient would bounce with 5.6.7.
    sink = make_sink("127.0.0.2", tls_context=pki.server_context() if tls else None)
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address,
        recipients=[UTF8_RCPT],
        data=EIGHT_BIT,
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )
    assert code == 250
    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == [UTF8_RCPT] and got.tls == tls
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(got.mail_options)
    assert "Schöne Grüße aus Köln.".encode() in got.data


async def test_ascii_envelope_with_8bit_body_is_not_sent_as_smtputf8(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address, recipients=["plain@alpha.test"], data=EIGHT_BIT, mail_options=["BODY=8BITMIME"]
    )
    assert code == 250
    (got,) = await sink.async_wait_for(1)
    assert without_size(got.mail_options) == ["BODY=8BITMIME"]


async def test_mx_without_smtputf8_bounces_a_non_ascii_recipient(make_stack, make_sink) -> None:
    sink = make_sink("127.0.0.2", smtputf8=False)
    make_sink("127.0.0.9")  # the sender's MX, where the DSN lands
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address, recipients=[UTF8_RCPT], data=message(), mail_options=["SMTPUTF8"]
    )
    assert code == 250
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == [UTF8_RCPT] and bounced.reply["enhanced"] == "5.6.7"
    assert sink.messages == [], "nothing was sent to the MX that cannot take it"


IDN_RCPT = "jo@bücher.test"
IDN_SENDER = "news@münchen.test"


async def test_mx_without_smtputf8_gets_an_idn_domain_as_a_labels(make_stack, make_sink, zone) -> None:
    # RFC 6531 needs SMTPUTF8 only for a non-ASCII local part; a domain has its A-label form.
    zone.add("xn--bcher-kva.test", "MX", "10 mx.xn--bcher-kva.test.")
    zone.add("mx.xn--bcher-kva.test", "A", "127.0.0.3")
    sink = make_sink("127.0.0.3", smtputf8=False)
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address,
        recipients=[IDN_RCPT],
        data=message(),
        mail_options=["SMTPUTF8"],
    )
    assert code == 250
    (got,) = await sink.async_wait_for(1)
    assert got.rcpt_tos == ["jo@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in got.mail_options
    (delivered,) = await wait_for_events(stack.config.nats.url, "delivered", 1)
    assert delivered.recipients == [IDN_RCPT], "outcomes name the recipient as it was given"


async def test_a_non_ascii_local_part_anywhere_needs_smtputf8(make_sink) -> None:
    sink = make_sink("127.0.0.3", smtputf8=False)
    settings = SessionSettings(port=sink.port, starttls=False, command_timeout=10.0)
    conn = await open_connection(sink.host, "mx.test", Source("", "relais.test"), settings, TlsPolicy())
    try:
        sent = await conn.transact(IDN_SENDER, [IDN_RCPT, "ann@b.test"], EIGHT_BIT)
        refused = await conn.transact(IDN_SENDER, [IDN_RCPT, UTF8_RCPT], EIGHT_BIT)
    finally:
        await conn.close()
    assert [(o.kind, o.recipient) for o in sent.outcomes] == [
        ("delivered", IDN_RCPT),
        ("delivered", "ann@b.test"),
    ]
    (got,) = sink.messages
    assert got.mail_from == "news@xn--mnchen-3ya.test"
    assert got.rcpt_tos == ["jo@xn--bcher-kva.test", "ann@b.test"]
    assert without_size(got.mail_options) == ["BODY=8BITMIME"]
    assert [o.kind for o in refused.outcomes] == ["bounced", "bounced"]
    assert refused.outcomes[0].reply.enhanced_status == "5.6.7"


UTF8_HEADERS = message(subject="Grüße", body="Hello.\r\n")


async def test_utf8_header_fields_submitted_with_smtputf8_go_out_with_smtputf8(make_stack, make_sink) -> None:
    # RFC 6532 header fields need SMTPUTF8 on every hop, even with an ASCII envelope.
    sink = make_sink("127.0.0.2")
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address, recipients=["plain@alpha.test"], data=UTF8_HEADERS, mail_options=["SMTPUTF8"]
    )
    assert code == 250
    (got,) = await sink.async_wait_for(1)
    assert "SMTPUTF8" in got.mail_options
    assert "Subject: Grüße".encode() in got.data


async def test_mx_without_smtputf8_bounces_utf8_header_fields_submitted_with_smtputf8(
    make_stack, make_sink
) -> None:
    # As Postfix does when the sender asked for SMTPUTF8: not sent where it would be mangled.
    sink = make_sink("127.0.0.2", smtputf8=False)
    make_sink("127.0.0.9")  # the sender's MX, where the DSN lands
    stack = await make_stack()
    code, _ = await asubmit(
        stack.smtp_address, recipients=["plain@alpha.test"], data=UTF8_HEADERS, mail_options=["SMTPUTF8"]
    )
    assert code == 250
    (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
    assert bounced.recipients == ["plain@alpha.test"] and bounced.reply["enhanced"] == "5.6.7"
    assert "header" in bounced.reply["text"]
    assert sink.messages == [], "nothing was sent to the MX that cannot take it"
