"""Where the header section of a submitted message ends, for the ingress and for the reader.

Postfix's cleanup (`mime_state.c`, `is_header.c`) ends it at the first line that neither begins
a field (`name:`, `name :`) nor continues one, puts its missing headers there, and an empty line
before that line. Mail readers end it there too (Python's parser here), or, for a few such lines
(`From ...`, `: x`), read on. The ingress must read the same section it checks and strips, and
add Message-ID:/Date: inside it: what it checks is what the reader shows, and the reverse.
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest

from services.ingress.replies import FROM_NOT_OWNED
from tests.integration.ingress.helpers import client, in_thread, login, queued, reply

OWN_FROM = b"From: Acme <news@acme.test>\r\n"
FOREIGN_FIELDS = b"From: CEO <ceo@bank.test>\r\nBcc: hidden@beta.test\r\n"


def _send(address: tuple[str, int], data: bytes) -> tuple[int, bytes]:
    with client(address) as smtp:
        login(smtp)
        smtp.mail("news@acme.test")
        smtp.rcpt("a@alpha.test")
        return smtp.data(data)


def _read(data: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


async def _queued_data(nats_url: str) -> bytes:
    [env] = await queued(nats_url)
    assert env.body.inline is not None
    return env.body.inline


async def test_added_message_id_and_date_are_in_the_readers_header_section(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    after = b"this is not a header\r\nTo: a@alpha.test\r\n\r\nbody\r\n"
    code, text = await in_thread(_send, ingress.smtp_address, OWN_FROM + b"Subject: hi\r\n" + after)
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    data = await _queued_data(ingress.config.nats.url)
    read = _read(data)
    assert read["Message-ID"] == f"<{queue_id}@{ingress.config.ingress.hostname}>"
    assert email.utils.parsedate_to_datetime(str(read["Date"])) is not None
    assert read["Subject"] == "hi" and read["To"] is None  # To: came after the header's end
    assert not read.defects  # an empty line now ends the header section, as with Postfix
    assert data.endswith(b"\r\n\r\n" + after)  # what followed is the sender's bytes, unchanged


@pytest.mark.parametrize(
    "stray",
    [
        b"this is not a header",
        b"From ceo@bank.test Thu Jan  1 00:00:00 2026",  # a reader reads on past an mbox From_
        b": a field without a name",  # and past this one
    ],
)
async def test_fields_after_a_line_that_is_no_field_are_body_for_the_ingress_and_the_reader(
    make_ingress: Callable[..., Any], stray: bytes
) -> None:
    ingress = await make_ingress()
    after = stray + b"\r\n" + FOREIGN_FIELDS + b"\r\nbody\r\n"
    code, _ = await in_thread(_send, ingress.smtp_address, OWN_FROM + after)
    assert code == 250  # the From: of bank.test is no header: nobody shows it as the author
    data = await _queued_data(ingress.config.nats.url)
    read = _read(data)
    assert read.get_all("From") == ["Acme <news@acme.test>"] and read["Bcc"] is None
    assert read["Message-ID"] is not None and read["Date"] is not None
    assert data.endswith(b"\r\n\r\n" + after)  # kept as body text, byte for byte


async def test_a_field_with_space_before_its_colon_is_written_without_it(
    make_ingress: Callable[..., Any],
) -> None:
    """`Subject : hi` is a field to Postfix and the ingress (RFC 5322 obs-optional), the end of
    the header to Python's parser: as Postfix does, the space goes, and both read the same."""
    ingress = await make_ingress()
    sent = OWN_FROM + b"Subject : hi\r\nTo: a@alpha.test\r\n\r\nbody\r\n"
    assert (await in_thread(_send, ingress.smtp_address, sent))[0] == 250
    data = await _queued_data(ingress.config.nats.url)
    read = _read(data)
    assert read["Subject"] == "hi" and read["To"] == "a@alpha.test"
    assert read["Message-ID"] is not None and read["Date"] is not None
    assert b"\r\nSubject: hi\r\n" in data and not read.defects


async def test_a_folded_line_at_the_top_continues_the_received_field(
    make_ingress: Callable[..., Any],
) -> None:
    """The ingress writes Received: above the sender's first line, so a first line starting
    with white space continues it (as in Postfix, whose smtpd writes Received: into the content
    cleanup reads), and the fields after it are header fields: checked, and shown."""
    ingress = await make_ingress()
    foreign = b" folded\r\n" + FOREIGN_FIELDS + b"\r\nbody\r\n"
    assert await in_thread(_send, ingress.smtp_address, foreign) == reply(FROM_NOT_OWNED)
    own = b" folded\r\n" + OWN_FROM + b"\r\nbody\r\n"
    assert (await in_thread(_send, ingress.smtp_address, own))[0] == 250
    read = _read(await _queued_data(ingress.config.nats.url))
    assert read.get_all("From") == ["Acme <news@acme.test>"]
    assert str(read["Received"]).endswith("folded")
    assert read["Message-ID"] is not None and read["Date"] is not None
