"""A DSN's address and host fields stay on one line, as Postfix, Exim and Sendmail write them.

Bounce processors read message/delivery-status line by line: Sisimai, the common open-source one,
takes the address from the `Final-Recipient:` line itself and joins continuation lines only to a
`Diagnostic-Code:`. Folded after its "rfc822;", a long recipient left that line without an address,
so such a reader found no recipient in the DSN at all."""

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage

from services.bounce.dsn import RecipientStatus, build_dsn

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
# 58 and 63 characters: longer than what fits after "Final-Recipient: rfc822; " within 78.
LONG_ADDRESS = "notifications+a8b7c6d5e4f3@reply.mail.example-company.test"
LONG_UTF8_ADDRESS = "jürgen.müller-lüdenscheidt@lüdenscheid.example-company.test"
LONG_HOST = "mx-eu-west-3-prod-gateway-07.inbound.mail.example-company.test"
LONG_REPORTER = "relais-bounce-7f9c8d6b5-x2k4q.outbound.mail.example-company.test"
DIAGNOSTIC = "550 5.1.1 " + " ".join(["The email account that you tried to reach does not exist."] * 3)


def make_dsn(recipients: list[RecipientStatus]) -> bytes:
    return build_dsn(
        reporting_mta=LONG_REPORTER,
        from_address="MAILER-DAEMON@relais.example",
        to_address="alice@sender.test",
        original_headers=b"Subject: hi\r\n\r\n",
        recipients=recipients,
        arrival_date=NOW,
        envelope_id="crm-campaign-20240301-7f3c9a2e-1b4d-4e8f-9a6b-2c1d0e9f8a7b",
        message_id="<dsn.1@relais.example>",
        date=NOW,
    )


def delivery_status_fields(raw: bytes) -> list[list[str]]:
    """Each field of the message/delivery-status part as its raw lines, first line first."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    assert [p.get_content_type() for p in msg.iter_parts()][1] == "message/delivery-status"
    boundary = f"\r\n--{msg.get_boundary()}".encode()
    start = raw.index(b"Content-Type: message/delivery-status\r\n\r\n")
    body = raw[start:].split(b"\r\n\r\n", 1)[1].split(boundary, 1)[0].decode("ascii")
    fields: list[list[str]] = []
    for line in body.split("\r\n"):
        if line[:1] in (" ", "\t"):
            fields[-1].append(line)
        elif line:
            fields.append([line])
    return fields


def read_by_line(fields: list[list[str]], name: str) -> list[str]:
    """What a line-oriented reader takes from each `name:` line: the value after "type;"."""
    return [f[0].partition(":")[2].partition(";")[2].strip() for f in fields if f[0].startswith(f"{name}:")]


def test_long_addresses_and_host_names_are_on_their_field_line() -> None:
    recipients = [
        RecipientStatus(
            final_recipient=LONG_ADDRESS,
            original_recipient=f"rfc822;{LONG_ADDRESS}",
            action="failed",
            status="5.1.1",
            diagnostic_code=DIAGNOSTIC,
            remote_mta=LONG_HOST,
            last_attempt=NOW,
        ),
        RecipientStatus(final_recipient=LONG_UTF8_ADDRESS, action="failed", status="5.1.1"),
    ]

    raw = make_dsn(recipients)
    fields = delivery_status_fields(raw)

    assert read_by_line(fields, "Reporting-MTA") == [LONG_REPORTER]
    assert read_by_line(fields, "Original-Recipient") == [LONG_ADDRESS]
    assert read_by_line(fields, "Final-Recipient") == [
        LONG_ADDRESS,
        "j\\x{FC}rgen.m\\x{FC}ller-l\\x{FC}denscheidt@l\\x{FC}denscheid.example-company.test",
    ]
    assert read_by_line(fields, "Remote-MTA") == [LONG_HOST]
    # Free text is still folded to short lines, which every reader joins to its Diagnostic-Code.
    folded = [f for f in fields if len(f) > 1]
    assert [f[0].partition(":")[0] for f in folded] == ["Diagnostic-Code"]
    assert all(len(line) <= 78 for line in folded[0])


def test_the_parsed_fields_are_unchanged() -> None:
    status = RecipientStatus(
        final_recipient=LONG_ADDRESS, action="failed", status="5.1.1", diagnostic_code=DIAGNOSTIC
    )

    msg = email.message_from_bytes(make_dsn([status]), policy=policy.default)

    per_message, bob = list(msg.iter_parts())[1].get_payload()
    assert per_message["Reporting-MTA"] == f"dns; {LONG_REPORTER}"
    assert bob["Final-Recipient"] == f"rfc822; {LONG_ADDRESS}"
    assert " ".join(bob["Diagnostic-Code"].split()) == f"smtp; {DIAGNOSTIC}"
