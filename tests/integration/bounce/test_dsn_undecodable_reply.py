"""A remote MX whose reply is not UTF-8 (a Latin-1 "Empfänger unbekannt", as older German or
Russian servers send): the failure still gets its DSN, and the recipient the same transaction
delivered gets the message once.

aiosmtplib hands such octets over as lone surrogates, which msgpack cannot encode. Before, the
attempt's bounce notice could not be published: delivery failed the job, which was redelivered
and sent again to the recipient that had accepted it (four copies in 50 s, with no end), and the
sender never heard of the failure. Postfix censors such octets to "?" (smtp_chat.c); so now
does `Reply`."""

from __future__ import annotations

import asyncio
import email

from tests.integration.bounce.conftest import wait_settled
from tests.integration.spine.conftest import DOMAINS
from tests.support.raw_smtp import ScriptedMX, serving
from tests.support.relais import RelaisStack, asubmit, message, wait_for_events

REFUSED = "gone@alpha.test"
ACCEPTED = "ok@alpha.test"


class RefusesInLatin1(ScriptedMX):
    """Refuses the second recipient of each transaction in Latin-1, accepts the others; counts
    the messages it took."""

    def __init__(self, *, host: str, port: int) -> None:
        super().__init__(host=host, port=port)
        self.rcpts = 0
        self.messages = 0

    def reply_to(self, verb: bytes) -> bytes | None:
        if verb == b"MAIL":
            self.rcpts = 0
        elif verb == b"RCPT":
            self.rcpts += 1
            if self.rcpts == 2:
                return b"550 5.1.1 <gone@alpha.test>: Empf\xe4nger unbekannt\r\n"
        return b"250 ok\r\n"

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                return None
        self.messages += 1
        return b"250 2.0.0 ok\r\n"


async def test_a_latin1_refusal_gets_its_dsn_and_the_accepted_recipient_one_copy(
    stack: RelaisStack, sender_mx, sink_port: int
) -> None:
    async with serving(RefusesInLatin1) as start:
        mx = await start(host=DOMAINS["alpha.test"], port=sink_port)
        code, _ = await asubmit(stack.smtp_address, recipients=[ACCEPTED, REFUSED], data=message())
        assert code == 250

        (bounced,) = await wait_for_events(stack.config.nats.url, "bounced", 1)
        assert bounced.recipients == [REFUSED]
        (dsn,) = await sender_mx.async_wait_for(1)
        parts = email.message_from_bytes(dsn.data).walk()
        status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
        (block,) = status.get_payload()[1:]
        assert block["Final-Recipient"] == f"rfc822; {REFUSED}"
        assert block["Action"] == "failed" and block["Status"] == "5.1.1"
        assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@alpha.test>: Empf?nger unbekannt"
        await wait_settled(stack.config.nats.url)
        assert mx.messages == 1, "the accepted recipient got the message again"
