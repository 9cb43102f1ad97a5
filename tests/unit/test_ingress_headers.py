"""Header block handling: strip control headers, add Message-ID/Date, leave everything else byte-exact."""

from __future__ import annotations

from services.ingress import headers

MSG = (
    b"From: Acme <news@acme.test>\r\n"
    b"X-Relais-Campaign: spring\r\n"
    b"X-Relais-Pool:\r\n bulk\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"\r\n"
    b"X-Relais-Pool: not a header, body text\r\n"
)


def test_split_and_fields() -> None:
    head, rest = headers.split_message(MSG)
    assert head.endswith(b"?=\r\n") and rest.startswith(b"\r\nX-Relais-Pool")
    assert headers.first_value(head, "x-relais-pool") == "bulk"
    assert headers.first_value(head, headers.CAMPAIGN_HEADER) == "spring"
    assert headers.first_value(head, "date") is None


def test_strip_control_headers_keeps_the_rest_byte_exact() -> None:
    head, rest = headers.split_message(MSG)
    stripped = headers.strip_fields(head, headers.CONTROL_HEADERS)
    assert stripped == b"From: Acme <news@acme.test>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    assert b"X-Relais-Pool: not a header" in stripped + rest


def test_fixups_add_only_what_is_missing() -> None:
    head = b"From: a@acme.test\r\n"
    fixed = headers.submission_fixups(head, message_id="abc", hostname="relais.test", now=0.0)
    assert fixed.startswith(head)
    assert b"Message-ID: <abc@relais.test>\r\n" in fixed
    assert b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n" in fixed
    complete = b"Message-Id: <x@y>\r\nDATE: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    assert headers.submission_fixups(complete, message_id="abc", hostname="h", now=0.0) == complete


def test_message_without_body_or_headers() -> None:
    assert headers.split_message(b"Subject: x\r\n") == (b"Subject: x\r\n", b"")
    assert headers.split_message(b"\r\nbody\r\n") == (b"", b"\r\nbody\r\n")


def test_one_parse_answers_every_question_like_the_functions() -> None:
    head, _ = headers.split_message(MSG)
    block = headers.HeaderBlock(head)
    assert block.first("X-Relais-Pool") == headers.first_value(head, "x-relais-pool") == "bulk"
    assert block.first("date") is None and not block.has("date") and block.has("FROM")
    assert block.without(headers.CONTROL_HEADERS) == headers.strip_fields(head, headers.CONTROL_HEADERS)
    assert block.without(("date",)) is head  # nothing to drop: the same bytes, no copy
    added = headers.missing_fields(block, message_id="abc", hostname="relais.test", now=0.0)
    assert head + added == headers.submission_fixups(head, message_id="abc", hostname="relais.test", now=0.0)


def test_the_header_ends_at_the_first_line_that_is_no_field() -> None:
    # Postfix's is_header: a name, white space, a colon; else a continuation (SP/HT) of a field.
    for stray in (b"not a header", b"From x@y.test Thu Jan  1 00:00:00 2026", b": no name", b"\xc3\xa9: x"):
        msg = b"From: a@acme.test\r\n folded\r\n" + stray + b"\r\nTo: b@beta.test\r\n\r\nbody\r\n"
        head, rest = headers.split_message(msg)
        assert head == b"From: a@acme.test\r\n folded\r\n" and rest.startswith(stray + b"\r\nTo:")
    assert headers.split_message(b"not a header\r\nFrom: a@acme.test\r\n") == (
        b"",
        b"not a header\r\nFrom: a@acme.test\r\n",
    )
    # A first line starting with white space continues the Received: written above it.
    assert headers.split_message(b" x\r\nFrom: a\r\n\r\nb\r\n") == (b" x\r\nFrom: a\r\n", b"\r\nb\r\n")
    assert headers.split_message(b"Subject : x\r\n\r\nb\r\n") == (b"Subject : x\r\n", b"\r\nb\r\n")


def test_join_puts_an_empty_line_where_the_header_ended_without_one() -> None:
    added = b"Date: now\r\n"
    assert headers.join(b"From: a\r\n", added, b"not a header\r\n") == (
        b"From: a\r\nDate: now\r\n\r\nnot a header\r\n"
    )
    assert headers.join(b"From: a\r\n", added, b"\r\nbody\r\n") == b"From: a\r\nDate: now\r\n\r\nbody\r\n"
    assert headers.join(b"From: a\r\n", added, b"") == b"From: a\r\nDate: now\r\n"
    # Obsolete `Name :` written `Name:` (as Postfix does); values and continuations untouched.
    assert headers.join(b"Subject \t: a : b\r\n x :\r\n", b"", b"") == b"Subject: a : b\r\n x :\r\n"
