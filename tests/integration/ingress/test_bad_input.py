"""Bad input gets the right reply or a clean close, and never a half-queued message."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from services.core.config import AccountConfig
from services.ingress.replies import NEEDS_8BITMIME, NEEDS_SMTPUTF8, NUL_BYTES
from tests.integration.ingress.helpers import client, in_thread, login, plain, queued, reply
from tests.support.relais import ACCOUNT, PASSWORD, message, password_hash


@pytest.fixture
async def ingress(make_ingress: Callable[..., Any]) -> Any:
    return await make_ingress()


def _raw(address: tuple[str, int], script: bytes, settle: float = 0.5) -> list[bytes]:
    """Send `script` in one write (pipelined), read until the server goes quiet or closes."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.recv(200)
        sock.sendall(script)
        data = b""
        sock.settimeout(settle)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        return data.split(b"\r\n")[:-1]


def _auth() -> bytes:
    return f"EHLO c.test\r\nAUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\n".encode()


async def test_nul_bytes_refused(ingress: Any) -> None:
    def send() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            smtp.rcpt("a@alpha.test")
            return smtp.data(b"Subject: x\r\n\r\nnul \x00 here\r\n")

    assert await in_thread(send) == reply(NUL_BYTES)
    assert await queued(ingress.config.nats.url) == []


async def test_eight_bit_needs_8bitmime(ingress: Any) -> None:
    body = "From: <news@acme.test>\r\nSubject: x\r\n\r\nGrüße\r\n".encode()

    def send(options: list[str]) -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test", options)
            smtp.rcpt("a@alpha.test")
            return smtp.data(body)

    assert await in_thread(send, []) == reply(NEEDS_8BITMIME)
    assert (await in_thread(send, ["BODY=8BITMIME"]))[0] == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.meta["body"] == "8BITMIME"


async def test_smtputf8_addresses_accepted_with_smtputf8_only(ingress: Any) -> None:
    async def send(utf8: bool) -> tuple[int, str]:
        smtp = aiosmtplib.SMTP(
            hostname=ingress.smtp_address[0], port=ingress.smtp_address[1], start_tls=False
        )
        await smtp.connect()
        try:
            await smtp.login(ACCOUNT, PASSWORD)
            options = ["SMTPUTF8"] if utf8 else []
            answer = await smtp.mail("news@acme.test", options=options)
            answer = await smtp.rcpt("josé@bücher.test", encoding="utf-8")
            if not utf8:
                return answer.code, answer.message
            answer = await smtp.data("From: <news@acme.test>\r\nSubject: ü\r\n\r\nolá\r\n".encode())
            return answer.code, answer.message
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        finally:
            smtp.close()

    assert await send(False) == (
        NEEDS_SMTPUTF8.code,
        f"{NEEDS_SMTPUTF8.enhanced_status} {NEEDS_SMTPUTF8.text}",
    )
    code, _ = await send(True)
    assert code == 250
    [env] = await queued(ingress.config.nats.url)
    assert env.recipients == ("josé@bücher.test",) and env.meta["smtputf8"] == "1"


async def test_commands_out_of_order_and_unknown(ingress: Any) -> None:
    script = b"MAIL FROM:<a@acme.test>\r\nEHLO c.test\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    lines = await in_thread(_raw, ingress.smtp_address, script + b"BDAT 10 LAST\r\nXYZZY\r\n")
    replies = [line for line in lines if not line.startswith(b"250-")]
    assert replies[0].startswith(b"503 5.5.1")  # MAIL before EHLO
    assert replies[1] == b"250 HELP"
    assert replies[2].startswith(b"503 5.5.1")  # RCPT before MAIL
    assert replies[3].startswith(b"503 5.5.1")  # DATA before RCPT
    assert replies[4].startswith(b"500 5.5.2")  # CHUNKING is not offered
    assert replies[5].startswith(b"500 5.5.2")


async def test_pipelined_transactions(ingress: Any) -> None:
    data = message().replace(b"\r\n.", b"\r\n..")
    script = _auth()
    for i in range(3):
        script += f"MAIL FROM:<news@acme.test>\r\nRCPT TO:<r{i}@alpha.test>\r\nDATA\r\n".encode()
        script += data + b"\r\n.\r\n"
    script += b"QUIT\r\n"
    lines = await in_thread(_raw, ingress.smtp_address, script, 2.0)
    codes = [line[:3] for line in lines if line[3:4] == b" "]
    assert codes == [b"250", b"235"] + [b"250", b"250", b"354", b"250"] * 3 + [b"221"]
    envs = await queued(ingress.config.nats.url)
    assert sorted(e.recipients[0] for e in envs) == ["r0@alpha.test", "r1@alpha.test", "r2@alpha.test"]


async def test_client_vanishing_mid_data_queues_nothing(ingress: Any) -> None:
    def vanish() -> None:
        with socket.create_connection(ingress.smtp_address, timeout=10) as sock:
            sock.recv(200)
            sock.sendall(_auth() + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n")
            time.sleep(0.3)
            sock.sendall(b"Subject: half\r\n\r\nhalf a messa")
        # closed here, mid-DATA, without the final dot

    await in_thread(vanish)
    await asyncio.sleep(0.5)
    assert await queued(ingress.config.nats.url) == []
    # The ingress is fine afterwards.
    code, _ = await in_thread(_send_ok, ingress.smtp_address)
    assert code == 250


def _send_ok(address: tuple[str, int]) -> tuple[int, bytes]:
    with client(address) as smtp:
        login(smtp)
        smtp.mail("news@acme.test")
        smtp.rcpt("a@alpha.test")
        return smtp.data(message())


async def test_helo_names_that_would_inject_a_header_are_refused(ingress: Any) -> None:
    # The HELO name goes into our Received: line, after the content checks ran on the message.
    script = b"EHLO evil\rX-Injected: yes\x00\r\nHELO \xff\xfe.test\r\n"
    script += _auth() + b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n"
    script += message() + b"\r\n.\r\n"
    lines = await in_thread(_raw, ingress.smtp_address, script, 2.0)
    replies = [line for line in lines if line[3:4] == b" "]
    assert replies[0].startswith(b"501 5.5.4") and replies[1].startswith(b"501 5.5.4")
    assert replies[-1].startswith(b"250")
    [env] = await queued(ingress.config.nats.url)
    body = env.body.inline or b""
    assert body.startswith(b"Received: from c.test ") and b"X-Injected" not in body


async def test_a_failing_hand_off_ends_the_transaction_and_refunds_the_quota(
    make_ingress: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    account = AccountConfig(password_hash=password_hash(), domains=["acme.test"], max_messages_per_hour=1)
    stack = await make_ingress(accounts={ACCOUNT: account})
    handoff = stack.ingress._handoff
    real = handoff.queue
    calls = 0

    async def fails_once(*args: Any, **kwargs: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("an unexpected fault while queueing")
        return await real(*args, **kwargs)

    monkeypatch.setattr(handoff, "queue", fails_once)
    transaction = (
        b"MAIL FROM:<news@acme.test>\r\nRCPT TO:<a@alpha.test>\r\nDATA\r\n" + message() + b"\r\n.\r\n"
    )
    lines = await in_thread(_raw, stack.smtp_address, _auth() + transaction * 2, 2.0)
    codes = [line[:3] for line in lines if line[3:4] == b" "]
    # The first DATA fails with 451; the next MAIL is no "nested MAIL", and the hourly quota
    # of one message was given back, so the second copy is accepted.
    assert codes == [b"250", b"235", b"250", b"250", b"354", b"451", b"250", b"250", b"354", b"250"]
    assert len(await queued(stack.config.nats.url)) == 1


async def test_a_recipient_given_twice_is_queued_once(ingress: Any) -> None:
    def send() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            for rcpt in ("bob@alpha.test", "bob@ALPHA.test", "Bob@alpha.test"):
                assert smtp.rcpt(rcpt)[0] == 250
            return smtp.data(message())

    assert (await in_thread(send))[0] == 250
    [env] = await queued(ingress.config.nats.url)
    # The domain's case does not make another recipient; the local part's may (RFC 5321 2.4).
    assert env.recipients == ("bob@alpha.test", "Bob@alpha.test")


async def test_a_recipient_whose_domain_is_spelt_two_ways_is_queued_once(ingress: Any) -> None:
    def send() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.command_encoding = "utf-8"
            smtp.mail("news@acme.test", ["SMTPUTF8"])
            for rcpt in ("bob@bücher.test", "bob@xn--bcher-kva.test", "bob@BÜCHER.test"):
                assert smtp.rcpt(rcpt)[0] == 250
            return smtp.data(message())

    assert (await in_thread(send))[0] == 250
    [env] = await queued(ingress.config.nats.url)
    # One mailbox: the router would otherwise send it one copy per spelling.
    assert len(env.recipients) == 1, env.recipients
