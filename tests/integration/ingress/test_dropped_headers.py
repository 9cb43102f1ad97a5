"""Header fields a submitted message loses before it is queued, as with Postfix's cleanup
(`message_drop_headers`: bcc, content-length, resent-bcc, return-path): a Bcc: delivered to the
To: and Cc: recipients names the blind ones; a Return-Path: is the final delivery's to write
(RFC 5321 4.4: an originating system SHOULD NOT send one); a Content-Length: can cut a message
short in an mbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.ingress import headers
from tests.integration.ingress.helpers import client, in_thread, login, queued

HEAD = (
    b"Return-Path: <ceo@paypal.test>\r\n"
    b"From: Acme <news@acme.test>\r\n"
    b"To: a@alpha.test\r\n"
    b"Bcc: secret@beta.test,\r\n\tother@gamma.test\r\n"
    b"RESENT-BCC: hidden@beta.test\r\n"
    b"Content-Length: 3\r\n"
    b"Subject: hi\r\n"
)
BODY = b"\r\nBcc: body text, not a header\r\nReturn-Path: <also@body.test>\r\n"


def _send(address: tuple[str, int], data: bytes) -> tuple[int, bytes]:
    with client(address) as smtp:
        login(smtp)
        smtp.mail("news@acme.test")
        smtp.rcpt("a@alpha.test")
        smtp.rcpt("secret@beta.test")
        return smtp.data(data)


async def test_blind_copies_and_trace_fields_of_the_sender_are_not_queued(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress()
    code, _ = await in_thread(_send, ingress.smtp_address, HEAD + BODY)
    assert code == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.recipients == ("a@alpha.test", "secret@beta.test")  # the envelope still has them
    data = env.body.inline or b""
    head, rest = headers.split_message(data)
    names = [name for name, _ in headers.fields(head)]
    for dropped in ("bcc", "resent-bcc", "return-path", "content-length"):
        assert dropped not in names, head
    assert b"secret@beta.test" not in head and b"other@gamma.test" not in head
    assert b"From: Acme <news@acme.test>\r\nTo: a@alpha.test\r\nSubject: hi\r\n" in head
    assert rest == BODY  # the body is never touched
