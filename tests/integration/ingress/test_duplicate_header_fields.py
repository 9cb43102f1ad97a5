"""A header field RFC 5322 3.6 allows once, given twice, and a From: of several mailboxes without
a Sender: (RFC 5322 3.6.2): refused at the end of DATA on submission listeners. Gmail refuses such
mail ("Multiple 'From' headers found", "duplicate headers") and Amazon SES too ("Duplicate header
'From'"): accepted, each would bounce later, put a valid mailbox on the suppression list and
count against the shared IP pool. Two From: fields would also let a reader show one while a
check reads the other. The inbound listener takes mail as it comes, for the bounce service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.ingress import headers
from services.ingress.replies import DUPLICATE_FIELD, FROM_NEEDS_SENDER, FROM_NOT_OWNED
from tests.integration.ingress.helpers import (
    client,
    in_thread,
    listening,
    queued,
    queued_inbound,
    reply,
    submit,
)

OWN_FROM = b"From: Acme <news@acme.test>\r\n"
BODY = b"\r\nbody\r\n"
# A value each field may hold, owned by acme.test where it is an author's address.
VALUES = {
    "Date": "Tue, 01 Dec 2026 10:00:00 +0000",
    "From": "Acme Desk <desk@acme.test>",
    "Sender": "<desk@acme.test>",
    "Reply-To": "<desk@acme.test>",
    "To": "a@alpha.test",
    "Cc": "b@alpha.test",
    "Message-ID": "<1@acme.test>",
    "In-Reply-To": "<0@alpha.test>",
    "References": "<0@alpha.test>",
    "Subject": "hi",
}
LOCAL = "bounces.relais.test"


def _twice(name: str) -> bytes:
    """A message with `name` twice, the second spelled in capitals, a field between them."""
    value = VALUES[name]
    first = b"" if name == "From" else f"{name}: {value}\r\n".encode()
    return OWN_FROM + first + b"X-Mailer: test\r\n" + f"{name.upper()}: {value}\r\n".encode() + BODY


def test_every_field_of_the_table_is_covered() -> None:
    assert set(VALUES) == set(headers.SINGLE_FIELDS)


@pytest.mark.parametrize("name", headers.SINGLE_FIELDS)
async def test_a_field_given_twice_is_refused(make_ingress: Callable[..., Any], name: str) -> None:
    ingress = await make_ingress()
    assert await in_thread(submit, ingress.smtp_address, _twice(name)) == reply(DUPLICATE_FIELD[name.lower()])
    assert await queued(ingress.config.nats.url) == []


async def test_fields_that_may_repeat_or_reach_no_reader_are_accepted(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    repeatable = (
        b"Received: from a.test by b.test; Tue, 01 Dec 2026 10:00:00 +0000\r\n" * 2
        + b"Comments: one\r\nComments: two\r\nKeywords: a\r\nKeywords: b\r\n"
        + b"Resent-Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nResent-From: <desk@acme.test>\r\n" * 2
        # Dropped before queueing (as by Postfix's cleanup), so no one downstream counts them.
        + b"Bcc: x@beta.test\r\nBcc: y@beta.test\r\n"
    )
    assert (await in_thread(submit, ingress.smtp_address, OWN_FROM + repeatable + BODY))[0] == 250
    # After the header's end (a line that is no field), a second From: is body text, as a reader shows it.
    after = b"this is not a header\r\nFrom: Acme Desk <desk@acme.test>\r\n" + BODY
    assert (await in_thread(submit, ingress.smtp_address, OWN_FROM + after))[0] == 250
    assert len(await queued(ingress.config.nats.url)) == 2


async def test_a_from_of_several_mailboxes_needs_a_sender(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    authors = b"From: Acme <news@acme.test>, desk@acme.test\r\nSubject: hi\r\n"
    assert await in_thread(submit, ingress.smtp_address, authors + BODY) == reply(FROM_NEEDS_SENDER)
    folded = b"from: news@acme.test,\r\n desk@acme.test\r\n"  # any case, folded
    assert await in_thread(submit, ingress.smtp_address, folded + BODY) == reply(FROM_NEEDS_SENDER)
    assert await queued(ingress.config.nats.url) == []
    with_sender = authors + b"Sender: <news@acme.test>\r\n"
    one_with_comma = b'From: "Acme, News" <news@acme.test>\r\n'  # one mailbox, a comma in its name
    for accepted in (with_sender, one_with_comma):
        assert (await in_thread(submit, ingress.smtp_address, accepted + BODY))[0] == 250
    assert len(await queued(ingress.config.nats.url)) == 2


async def test_every_from_field_is_checked_for_ownership(make_ingress: Callable[..., Any]) -> None:
    """The From: ownership check reads every From: field, and a foreign one stays the reason."""
    ingress = await make_ingress()
    foreign_second = OWN_FROM + b"From: CEO <ceo@bank.test>\r\n" + BODY
    foreign_first = b"From: CEO <ceo@bank.test>\r\n" + OWN_FROM + BODY
    for data in (foreign_second, foreign_first):
        assert await in_thread(submit, ingress.smtp_address, data) == reply(FROM_NOT_OWNED)
    assert await queued(ingress.config.nats.url) == []


async def test_report_only_from_check_does_not_let_a_second_from_through(
    make_ingress: Callable[..., Any],
) -> None:
    """Under from_header_check = "report" a foreign From: is accepted and flagged; a second From:
    field is refused all the same, whosever it is."""
    ingress = await make_ingress(ingress={"from_header_check": "report"})
    foreign_second = OWN_FROM + b"From: CEO <ceo@bank.test>\r\n" + BODY
    assert await in_thread(submit, ingress.smtp_address, foreign_second) == reply(DUPLICATE_FIELD["from"])
    assert await queued(ingress.config.nats.url) == []


def _send_inbound(address: tuple[str, int], data: bytes) -> tuple[int, bytes]:
    with client(address) as smtp:
        smtp.mail("mailer-daemon@alpha.test")
        smtp.rcpt(f"postmaster@{LOCAL}")
        return smtp.data(data)


async def test_the_inbound_listener_takes_mail_as_it_comes(make_ingress: Callable[..., Any]) -> None:
    stack, [inbound] = await listening(make_ingress, {"local_domains": [LOCAL]}, {"mode": "inbound"})
    data = b"From: <a@alpha.test>\r\nFrom: <b@alpha.test>, <c@alpha.test>\r\nSubject: x\r\nSubject: y\r\n"
    assert (await in_thread(_send_inbound, inbound, data + BODY))[0] == 250
    assert len(await queued_inbound(stack.config.nats.url)) == 1
