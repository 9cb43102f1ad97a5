"""On acceptance: Received (TLS and account), Message-ID/Date fix-ups, envelope facts, control
headers gone by the time the MX sees the message (whole stack)."""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from typing import Any

from services.core.config import AccountConfig, PoolConfig
from tests.integration.ingress.helpers import client, in_thread, login, tls_sections
from tests.support.certs import TestPKI
from tests.support.relais import ACCOUNT, password_hash, read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink

BARE = (
    b"From: Acme <news@acme.test>\r\nX-Relais-Campaign: launch\r\nX-Relais-Pool: default\r\n"
    b"Subject: hi\r\n\r\nbody\r\n"
)


async def test_received_fixups_and_facts(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink], pki: TestPKI
) -> None:
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        ingress=tls_sections(pki),
        pools={"default": PoolConfig()},
        accounts={ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["acme.test"])},
    )

    def send() -> tuple[int, bytes]:
        with client(stack.smtp_address, pki=pki, starttls=True) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            smtp.rcpt("bob@alpha.test")
            return smtp.data(BARE)

    code, text = await in_thread(send)
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    [got] = await sink.async_wait_for(1)
    parsed = got.parsed()
    received = str(parsed["Received"])
    assert "(using TLSv1." in received and "with cipher" in received
    assert f"authenticated as {ACCOUNT}" in received and f"id {queue_id}" in received
    assert "with ESMTPSA" in received
    assert parsed["Message-ID"] == f"<{queue_id}@relais.test>"
    assert email.utils.parsedate_to_datetime(str(parsed["Date"])) is not None
    assert "X-Relais-Campaign" not in parsed and "X-Relais-Pool" not in parsed
    assert b"\r\nFrom: Acme <news@acme.test>\r\nSubject: hi\r\n" in got.data
    assert got.data.endswith(b"\r\n\r\nbody\r\n")
    await wait_for_events(stack.config.nats.url, "delivered", 1)
    [accepted] = [e for e in await read_events(stack.config.nats.url) if e.kind == "accepted"]
    assert accepted.message_id == queue_id and accepted.account == ACCOUNT
