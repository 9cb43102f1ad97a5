"""RFC 3464 DSNs: parsed back with the stdlib and read by flufl.bounce, as a remote MTA would."""

import base64
import email
import email.message
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest
from flufl.bounce import all_failures, scan_message

from services.bounce import dsn
from services.bounce.dsn import (
    SUBJECT_DELAYED,
    SUBJECT_DELIVERED,
    SUBJECT_FAILED,
    RecipientStatus,
    build_dsn,
    is_report,
)

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
ARRIVED = NOW - timedelta(hours=4)
REPORTING_MTA = "relais.example"
MAILER_DAEMON = "MAILER-DAEMON@relais.example"
SENDER = "alice@sender.test"
DSN_ID = "<dsn.20240301120000.1@relais.example>"
ORIGINAL_HEADERS = (
    b"Return-Path: <alice@sender.test>\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@x.test, carol@y.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig.1@sender.test>\r\n"
    b"Date: Fri, 01 Mar 2024 08:00:00 +0000\r\n"
    b"\r\n"
)
ORIGINAL_MESSAGE = ORIGINAL_HEADERS + b"Hi Bob,\r\nthe numbers are attached.\r\n"
GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser"
    " a1-20020a05600c000100b00412345678si1234567wmq.123 - gsmtp"
)

BOB_FAILED = RecipientStatus(
    final_recipient="bob@x.test",
    action="failed",
    status="5.1.1",
    diagnostic_code="550 5.1.1 <bob@x.test>: Recipient address rejected: User unknown",
    remote_mta="mx1.x.test",
    last_attempt=NOW,
)
CAROL_DELAYED = RecipientStatus(
    final_recipient="carol@y.test",
    action="delayed",
    status="4.2.2",
    diagnostic_code="452 4.2.2 The email account that you tried to reach is over quota.",
    remote_mta="mx.y.test",
    last_attempt=NOW,
    will_retry_until=ARRIVED + timedelta(days=5),
)


def make_dsn(recipients: list[RecipientStatus], **overrides: object) -> bytes:
    kwargs: dict[str, object] = {
        "reporting_mta": REPORTING_MTA,
        "from_address": MAILER_DAEMON,
        "to_address": SENDER,
        "original_headers": ORIGINAL_HEADERS,
        "recipients": recipients,
        "arrival_date": ARRIVED,
        "message_id": DSN_ID,
        "date": NOW,
    }
    kwargs.update(overrides)
    return build_dsn(**kwargs)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def status_blocks(msg: EmailMessage) -> list[Message]:
    """The per-message block followed by one block per recipient."""
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def assert_wire_clean(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert raw.endswith(b"\r\n")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# -- structure and headers ------------------------------------------------------------------------


def test_top_level_headers() -> None:
    msg = parse(make_dsn([BOB_FAILED]))

    assert msg["From"].addresses[0].addr_spec == MAILER_DAEMON
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Subject"] == SUBJECT_FAILED
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"] == DSN_ID
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary()


def test_three_parts_in_rfc_3464_order() -> None:
    msg = parse(make_dsn([BOB_FAILED]))

    types = [part.get_content_type() for part in msg.iter_parts()]

    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


def test_per_message_fields_in_rfc_3464_order() -> None:
    msg = parse(make_dsn([BOB_FAILED], envelope_id="QQ314159"))

    per_message = status_blocks(msg)[0]

    # RFC 3464 section 2.2: original-envelope-id, reporting-mta, ..., arrival-date.
    assert list(per_message.keys()) == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date"]
    assert per_message["Reporting-MTA"] == "dns; relais.example"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVED


def test_envelope_id_is_omitted_when_unknown() -> None:
    per_message = status_blocks(parse(make_dsn([BOB_FAILED])))[0]

    assert "Original-Envelope-Id" not in per_message


def test_per_recipient_fields() -> None:
    msg = parse(make_dsn([BOB_FAILED]))

    [bob] = status_blocks(msg)[1:]

    assert bob["Final-Recipient"] == "rfc822; bob@x.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.x.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@x.test>: Recipient address rejected: User unknown"
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]) == NOW
    assert "Original-Recipient" not in bob
    assert "Will-Retry-Until" not in bob


def test_a_reply_relais_made_itself_gets_its_own_diagnostic_type() -> None:
    null_mx = RecipientStatus(
        "bob@x.test",
        "failed",
        "5.1.10",
        diagnostic_code="556 5.1.10 Recipient domain does not accept mail (null MX)",
        diagnostic_type=dsn.diagnostic_type("DNS"),
    )

    [bob] = status_blocks(parse(make_dsn([null_mx])))[1:]

    assert bob["Diagnostic-Code"] == "x-relais; 556 5.1.10 Recipient domain does not accept mail (null MX)"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("DNS", "x-relais"),
        ("QUEUE", "x-relais"),
        ("ADMIN", "x-relais"),
        ("RCPT", "smtp"),
        ("DATA", "smtp"),
        # A CONNECT reply may be the MX's greeting: it stays "smtp".
        ("CONNECT", "smtp"),
        ("", "smtp"),
    ],
)
def test_diagnostic_type_of_a_reply_follows_its_stage(command: str, expected: str) -> None:
    assert dsn.diagnostic_type(command) == expected


@pytest.mark.parametrize("bad", ["", "smtp;", "x relais", "1smtp", "smtp\r\nX-Evil: 1"])
def test_a_diagnostic_type_that_is_not_an_atom_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="diagnostic_type"):
        RecipientStatus("bob@x.test", "failed", "5.1.1", diagnostic_code="550", diagnostic_type=bad)


def test_optional_recipient_fields_are_omitted() -> None:
    bare = RecipientStatus(final_recipient="dave@z.test", action="failed", status="5.4.4")

    [dave] = status_blocks(parse(make_dsn([bare])))[1:]

    assert set(dave.keys()) == {"Final-Recipient", "Action", "Status"}


@pytest.mark.parametrize(
    ("given", "emitted"),
    [
        ("bob@orig.test", "rfc822; bob@orig.test"),
        ("rfc822;bob@orig.test", "rfc822; bob@orig.test"),
        ("x400; /C=fr/O=example/S=bob", "x400; /C=fr/O=example/S=bob"),
    ],
)
def test_original_recipient_gets_an_address_type_unless_it_has_one(given: str, emitted: str) -> None:
    status = RecipientStatus("bob@x.test", "failed", "5.1.1", original_recipient=given)

    [bob] = status_blocks(parse(make_dsn([status])))[1:]

    assert bob["Original-Recipient"] == emitted


def test_already_typed_mta_names_are_kept() -> None:
    status = RecipientStatus("bob@x.test", "failed", "5.1.1", remote_mta="dns; mx1.x.test")

    msg = parse(make_dsn([status], reporting_mta="dns;relais.example"))

    assert status_blocks(msg)[0]["Reporting-MTA"] == "dns; relais.example"
    assert status_blocks(msg)[1]["Remote-MTA"] == "dns; mx1.x.test"


def test_multi_line_reply_is_unfolded_into_one_diagnostic() -> None:
    status = RecipientStatus("bob@gmail.test", "failed", "5.1.1", diagnostic_code=GMAIL_NO_SUCH_USER)

    raw = make_dsn([status])
    [bob] = status_blocks(parse(raw))[1:]

    assert bob["Diagnostic-Code"] == "smtp; " + " ".join(GMAIL_NO_SUCH_USER.split())
    assert_wire_clean(raw)


def test_several_recipients_each_get_a_block() -> None:
    dave = RecipientStatus("dave@z.test", "failed", "5.2.1", "550 5.2.1 The email account is disabled.")

    blocks = status_blocks(parse(make_dsn([BOB_FAILED, CAROL_DELAYED, dave])))[1:]

    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; bob@x.test", "failed", "5.1.1"),
        ("rfc822; carol@y.test", "delayed", "4.2.2"),
        ("rfc822; dave@z.test", "failed", "5.2.1"),
    ]
    assert parsedate_to_datetime(blocks[1]["Will-Retry-Until"]) == ARRIVED + timedelta(days=5)


# -- subject and notification text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipients", "subject"),
    [
        ([BOB_FAILED], SUBJECT_FAILED),
        ([CAROL_DELAYED], SUBJECT_DELAYED),
        ([BOB_FAILED, CAROL_DELAYED], SUBJECT_FAILED),
        ([RecipientStatus("bob@x.test", "delivered", "2.0.0")], SUBJECT_DELIVERED),
    ],
)
def test_subject_follows_the_worst_outcome(recipients: list[RecipientStatus], subject: str) -> None:
    assert parse(make_dsn(recipients))["Subject"] == subject


def test_notification_names_each_failed_recipient_and_why() -> None:
    msg = parse(make_dsn([BOB_FAILED, CAROL_DELAYED]))

    text = msg.get_payload()[0].get_content()

    assert "This is the mail system at host relais.example." in text
    assert "could not be delivered" in text
    unwrapped = " ".join(text.split())
    assert (
        "<bob@x.test>: host mx1.x.test said: 550 5.1.1 <bob@x.test>: Recipient address rejected: "
        "User unknown" in unwrapped
    )
    assert "<carol@y.test>: host mx.y.test said: 452 4.2.2" in unwrapped
    assert all(len(line) <= 76 for line in text.splitlines())


def test_delay_notification_is_a_warning() -> None:
    text = parse(make_dsn([CAROL_DELAYED])).get_payload()[0].get_content()

    assert "THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE." in text
    assert "for 4.0 hours" in text
    assert "will be retried until Wed, 06 Mar 2024 08:00:00 +0000" in " ".join(text.split())


# -- what flufl.bounce (Mailman's bounce detector) makes of it -------------------------------------


def test_flufl_bounce_sees_failures_as_permanent() -> None:
    msg = parse(make_dsn([BOB_FAILED]))

    assert scan_message(msg) == {b"bob@x.test"}
    assert all_failures(msg) == (set(), {b"bob@x.test"})


def test_flufl_bounce_sees_delays_as_temporary() -> None:
    msg = parse(make_dsn([CAROL_DELAYED]))

    assert scan_message(msg) == set()
    assert all_failures(msg) == ({b"carol@y.test"}, set())


def test_flufl_bounce_with_several_recipients() -> None:
    dave = RecipientStatus("dave@z.test", "failed", "5.2.1", "550 5.2.1 The email account is disabled.")
    erin = RecipientStatus("erin@x.test", "delivered", "2.0.0", "250 2.0.0 OK", "mx1.x.test")

    msg = parse(make_dsn([BOB_FAILED, CAROL_DELAYED, dave, erin]))

    assert all_failures(msg) == ({b"carol@y.test"}, {b"bob@x.test", b"dave@z.test"})


def test_flufl_bounce_prefers_the_original_recipient() -> None:
    # Mailman wants the address it subscribed, i.e. ORCPT, not what an alias expanded to.
    forwarded = RecipientStatus(
        "bob@x.test", "failed", "5.1.1", original_recipient="rfc822;bob@list-alias.test"
    )

    assert scan_message(parse(make_dsn([forwarded]))) == {b"bob@list-alias.test"}


# -- the returned original -----------------------------------------------------------------------


def test_headers_only_by_default() -> None:
    msg = parse(make_dsn([BOB_FAILED]))

    returned = msg.get_payload()[2]

    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get("Content-Transfer-Encoding") is None
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS[:-2]


def test_a_message_no_longer_held_gets_no_returned_part_and_says_so() -> None:
    raw = make_dsn([BOB_FAILED], original_headers=b"")
    msg = parse(raw)

    assert [part.get_content_type() for part in msg.iter_parts()] == ["text/plain", "message/delivery-status"]
    text = " ".join(msg.get_payload()[0].get_payload(decode=True).decode().split())  # unwrapped
    assert "It is no longer held here, so none of it is attached." in text
    assert "attached below" not in text and "attached returned message" not in text
    assert_wire_clean(raw)


def test_whole_message_given_only_its_headers_are_returned() -> None:
    msg = parse(make_dsn([BOB_FAILED], original_headers=ORIGINAL_MESSAGE))

    assert msg.get_payload()[2].get_payload(decode=True) == ORIGINAL_HEADERS[:-2]


def test_ret_full_includes_the_original_message() -> None:
    msg = parse(make_dsn([BOB_FAILED], original_message=ORIGINAL_MESSAGE))

    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Message-ID"] == "<orig.1@sender.test>"
    assert inner["Subject"] == "quarterly numbers"
    assert inner.get_content() == "Hi Bob,\r\nthe numbers are attached.\r\n"
    assert "It's attached below." in msg.get_payload()[0].get_content()
    assert scan_message(msg) == {b"bob@x.test"}


def test_ret_full_with_lf_line_endings_is_normalised() -> None:
    raw = make_dsn([BOB_FAILED], original_message=ORIGINAL_MESSAGE.replace(b"\r\n", b"\n"))

    assert_wire_clean(raw)
    [inner] = parse(raw).get_payload()[2].get_payload()
    assert inner["Subject"] == "quarterly numbers"


def test_ret_full_with_8bit_body_falls_back_to_headers() -> None:
    eight_bit = ORIGINAL_HEADERS + "Grüße aus Köln\r\n".encode()

    raw = make_dsn([BOB_FAILED], original_message=eight_bit)

    assert raw.isascii()
    msg = parse(raw)
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "only its headers are returned" in " ".join(msg.get_payload()[0].get_content().split())


@pytest.mark.parametrize(
    ("subject", "charset"),
    [("Grüße".encode(), "utf-8"), ("Gr\xfc\xdfe".encode("latin-1"), None)],
    ids=["utf-8", "unlabelled-latin-1"],
)
def test_8bit_original_headers_are_base64_encoded(subject: bytes, charset: str | None) -> None:
    headers = b"From: alice@sender.test\r\nSubject: " + subject + b"\r\n\r\n"

    raw = make_dsn([BOB_FAILED], original_headers=headers)

    assert raw.isascii()
    assert_wire_clean(raw)
    returned = parse(raw).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "base64"
    assert returned.get_param("charset") == charset
    assert returned.get_payload(decode=True) == headers[:-2]
    assert isinstance(returned.get_content(), str)


def test_over_long_original_header_line_is_base64_encoded() -> None:
    headers = b"X-Long: " + b"a" * 1200 + b"\r\n\r\n"

    raw = make_dsn([BOB_FAILED], original_headers=headers)

    assert_wire_clean(raw)
    assert base64.b64decode(parse(raw).get_payload()[2].get_payload()) == headers[:-2]


# -- the wire format -----------------------------------------------------------------------------


def test_crlf_everywhere_and_no_line_over_998_octets() -> None:
    huge_diagnostic = "550 5.7.1 " + " ".join(["blocked"] * 400) + " " + "x" * 2500
    status = RecipientStatus("bob@x.test", "failed", "5.7.1", huge_diagnostic, "mx1.x.test")

    raw = make_dsn(
        [status, CAROL_DELAYED],
        original_headers=ORIGINAL_HEADERS.replace(b"\r\n", b"\n"),
        envelope_id="ENV-" + "e" * 100,
    )

    assert_wire_clean(raw)
    assert raw.isascii()
    [bob, _] = status_blocks(parse(raw))[1:]
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.7.1 blocked blocked")


def test_single_long_word_is_split_below_998_octets() -> None:
    raw = make_dsn([BOB_FAILED], envelope_id="E" * 1500)

    assert_wire_clean(raw)
    per_message = status_blocks(parse(raw))[0]
    assert per_message["Original-Envelope-Id"].replace(" ", "") == "E" * 1500


def test_non_ascii_diagnostic_is_escaped_not_dropped() -> None:
    status = RecipientStatus("bob@x.test", "failed", "5.1.1", "550 5.1.1 Empfänger unbekannt")

    raw = make_dsn([status])

    assert raw.isascii()
    [bob] = status_blocks(parse(raw))[1:]
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\xe4nger unbekannt"


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    status = RecipientStatus("jürgen@x.test", "failed", "5.1.1")

    raw = make_dsn([status])

    assert raw.isascii()
    [jurgen] = status_blocks(parse(raw))[1:]
    assert jurgen["Final-Recipient"] == "utf-8; j\\x{FC}rgen@x.test"


def test_output_is_reproducible() -> None:
    assert make_dsn([BOB_FAILED, CAROL_DELAYED]) == make_dsn([BOB_FAILED, CAROL_DELAYED])


def test_boundary_never_occurs_inside_a_part() -> None:
    raw = make_dsn([BOB_FAILED])
    boundary = parse(raw).get_boundary().encode()

    assert raw.count(b"--" + boundary) == 4  # three parts and the close delimiter


# -- refusing bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"to_address": ""},
        {"to_address": "<>"},
        {"to_address": "alice@sender.test\r\nBcc: victim@x.test"},
        {"from_address": "MAILER-DAEMON@relais.example\nX-Evil: 1"},
        {"message_id": "dsn.1@relais.example"},
        {"envelope_id": "ENV\r\n\r\n--boundary"},
        {"arrival_date": datetime(2024, 3, 1, 8, 0)},
    ],
    ids=[
        "empty-sender",
        "null-sender",
        "crlf-in-to",
        "lf-in-from",
        "bare-message-id",
        "crlf-in-envid",
        "naive-date",
    ],
)
def test_rejects_invalid_input(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_dsn([BOB_FAILED], **overrides)


def test_rejects_a_dsn_without_recipients() -> None:
    with pytest.raises(ValueError):
        make_dsn([])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "bounced"},
        {"status": "550"},
        {"status": "5.1"},
        {"action": "failed", "will_retry_until": NOW},
        {"final_recipient": "bob@x.test\r\nAction: delivered"},
        {"remote_mta": "mx\n"},
    ],
)
def test_recipient_status_rejects_invalid_fields(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"final_recipient": "bob@x.test", "action": "failed", "status": "5.1.1"}
    fields.update(kwargs)

    with pytest.raises(ValueError):
        RecipientStatus(**fields)  # type: ignore[arg-type]


# -- loop prevention ------------------------------------------------------------------------------


def test_our_own_dsn_is_recognised() -> None:
    assert is_report(parse(make_dsn([BOB_FAILED])))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Content-Type": "text/plain"}, False),
        ({"Auto-Submitted": "no"}, False),
        # Automatic mail from a sender is owed a DSN (Postfix sends one); only reports are not.
        ({"auto-submitted": "auto-replied"}, False),
        ({"Auto-Submitted": "auto-generated; owner-email=ops@x.test"}, False),
        ({"Auto-Submitted": "auto-notified"}, False),
        ({"Content-Type": 'multipart/report; report-type="delivery-status"; boundary=b'}, True),
        ({"content-type": "Multipart/Report; Report-Type=Delivery-Status; boundary=b"}, True),
        ({"Content-Type": "multipart/report; report-type=disposition-notification; boundary=b"}, True),
        ({"Content-Type": "multipart/report; report-type=feedback-report; boundary=b"}, False),
        ({"Content-Type": "multipart/mixed; report-type=delivery-status; boundary=b"}, False),
        ({}, False),
    ],
)
def test_is_report_on_header_mappings(headers: dict[str, str], expected: bool) -> None:
    assert is_report(headers) is expected


def test_is_report_on_a_compat32_message() -> None:
    msg = email.message_from_bytes(
        b"Auto-Submitted: auto-replied\r\n"
        b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n\r\n--b--\r\n"
    )

    assert isinstance(msg, email.message.Message)
    assert is_report(msg)


def test_an_auto_generated_message_is_not_a_report() -> None:
    msg = email.message_from_bytes(b"Auto-Submitted: auto-generated\r\nSubject: Your receipt\r\n\r\nhi\r\n")

    assert not is_report(msg)
