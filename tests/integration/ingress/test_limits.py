"""Limits, each with its proper reply: size, recipients, lines, headers, connections, sessions,
messages per hour/day (across replicas), idle timeout, errors per session."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time
from collections.abc import Callable
from typing import Any

from services.core.config import AccountConfig
from services.ingress.replies import (
    AUTH_OK,
    DAILY_LIMIT,
    HEADER_TOO_BIG,
    HOURLY_LIMIT,
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_RECIPIENTS,
    TOO_MANY_SESSIONS,
)
from tests.integration.ingress.helpers import (
    client,
    in_thread,
    login,
    plain,
    queued,
    reply,
    send_counted,
    submit,
)
from tests.support.relais import ACCOUNT, PASSWORD, message, password_hash

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 12  # ~12 KB


def _accounts(**limits: int) -> dict[str, Any]:
    return {ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["acme.test"], **limits)}


async def test_size_is_advertised_and_enforced(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_message_size": 10_000})

    def scenario() -> tuple[str, tuple[int, bytes], tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            advertised = smtp.esmtp_features.get("size", "")
            declared = smtp.mail("news@acme.test", ["SIZE=20000"])
            smtp.rset()
            # The client claims a small message and then sends a big one.
            smtp.mail("news@acme.test", ["SIZE=500"])
            smtp.rcpt("a@alpha.test")
            lied = smtp.data(BIG)
            return advertised, declared, lied

    advertised, declared, lied = await in_thread(scenario)
    assert advertised == "10000"
    assert declared == reply(MESSAGE_TOO_BIG) and lied == reply(MESSAGE_TOO_BIG)
    assert await queued(ingress.config.nats.url) == []


async def test_recipient_limit(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_recipients": 2})

    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            replies = [smtp.rcpt(f"r{i}@alpha.test") for i in range(3)]
            smtp.data(message())
            return replies

    replies = await in_thread(scenario)
    assert [r[0] for r in replies[:2]] == [250, 250] and replies[2] == reply(TOO_MANY_RECIPIENTS)
    [env] = await queued(ingress.config.nats.url)
    assert env.recipients == ("r0@alpha.test", "r1@alpha.test")


async def test_line_length_and_header_size(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_header_size": 2_000})
    just_ok = b"From: <news@acme.test>\r\n\r\n" + b"a" * 998 + b"\r\n"
    too_long = b"From: <news@acme.test>\r\n\r\n" + b"a" * 999 + b"\r\n"
    far_too_long = b"From: <news@acme.test>\r\n\r\n" + b"a" * 5000 + b"\r\n"
    big_headers = b"From: <news@acme.test>\r\n" + b"X-Pad: p\r\n" * 300 + b"\r\nbody\r\n"
    assert (await in_thread(submit, ingress.smtp_address, just_ok))[0] == 250
    assert await in_thread(submit, ingress.smtp_address, too_long) == reply(LINE_TOO_LONG)
    assert await in_thread(submit, ingress.smtp_address, far_too_long) == reply(LINE_TOO_LONG)
    assert await in_thread(submit, ingress.smtp_address, big_headers) == reply(HEADER_TOO_BIG)
    assert len(await queued(ingress.config.nats.url)) == 1


async def test_connections_per_client_ip(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_connections_per_ip": 2})

    def scenario() -> bytes:
        held = [socket.create_connection(ingress.smtp_address, timeout=5) for _ in range(2)]
        try:
            for sock in held:
                assert sock.recv(200).startswith(b"220")
            with socket.create_connection(ingress.smtp_address, timeout=5) as third:
                return third.recv(200)
        finally:
            for sock in held:
                sock.close()

    assert await in_thread(scenario) == f"{TOO_MANY_CONNECTIONS}\r\n".encode()


async def test_concurrent_sessions_per_account_across_replicas(make_ingress: Callable[..., Any]) -> None:
    one = await make_ingress(accounts=_accounts(max_sessions=2))
    two = await make_ingress(accounts=_accounts(max_sessions=2))

    async def both_see(count: int) -> None:
        # The KV watch carries each replica's count to the other within moments.
        for _ in range(100):
            if all(s.ingress.sessions.open_sessions(ACCOUNT) == count for s in (one, two)):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"replicas never agreed on {count} open sessions")

    def authenticated(address: tuple[str, int]) -> smtplib.SMTP:
        smtp = client(address)
        login(smtp)
        return smtp

    first = await in_thread(authenticated, one.smtp_address)
    second = await in_thread(authenticated, two.smtp_address)
    try:
        await both_see(2)
        refused = await in_thread(_auth_once, one.smtp_address)
        await in_thread(first.quit)
        await both_see(1)
        accepted = await in_thread(_auth_once, two.smtp_address)
    finally:
        await in_thread(first.close)
        await in_thread(second.close)
    assert refused == reply(TOO_MANY_SESSIONS)
    assert accepted == reply(AUTH_OK)
    await both_see(0)
    # A count gone to zero is not kept: an account's entries end with its sessions.
    assert not one.ingress.sessions._others and not two.ingress.sessions._others


def _auth_once(address: tuple[str, int]) -> tuple[int, bytes]:
    with client(address) as smtp:
        return smtp.docmd("AUTH", "PLAIN " + _plain_ok())


def _plain_ok() -> str:
    return plain(ACCOUNT, PASSWORD)


async def test_hourly_limit_across_replicas(make_ingress: Callable[..., Any]) -> None:
    one = await make_ingress(accounts=_accounts(max_messages_per_hour=3))
    two = await make_ingress(accounts=_accounts(max_messages_per_hour=3))

    results = [await in_thread(send_counted, s.smtp_address) for s in (one, two, one)]
    more = [await in_thread(send_counted, s.smtp_address) for s in (two, one)]
    assert [r[0] for r in results] == [250, 250, 250]
    assert more == [reply(HOURLY_LIMIT), reply(HOURLY_LIMIT)]
    assert len(await queued(one.config.nats.url)) == 3


async def test_daily_limit(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(accounts=_accounts(max_messages_per_day=1))

    assert (await in_thread(send_counted, ingress.smtp_address))[0] == 250
    assert await in_thread(send_counted, ingress.smtp_address) == reply(DAILY_LIMIT)


async def test_idle_timeout_says_421(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"command_timeout": 0.5})

    def scenario() -> bytes:
        with socket.create_connection(ingress.smtp_address, timeout=5) as sock:
            sock.recv(200)
            sock.sendall(b"EHLO client.test\r\n")
            time.sleep(0.1)
            sock.recv(1000)
            data = b""
            while chunk := sock.recv(1000):
                data += chunk
            return data

    assert await in_thread(scenario) == f"{TIMEOUT}\r\n".encode()


async def test_too_many_errors_disconnects(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_errors": 3})

    def scenario() -> list[bytes]:
        with socket.create_connection(ingress.smtp_address, timeout=5) as sock:
            sock.recv(200)
            sock.sendall(b"EHLO client.test\r\n")
            time.sleep(0.2)
            sock.recv(1000)
            sock.sendall(b"RCPT TO:<a@alpha.test>\r\nBOGUS\r\nDATA\r\nNOOP\r\n")
            data = b""
            while chunk := sock.recv(1000):
                data += chunk
            return data.splitlines()

    lines = await in_thread(scenario)
    assert [line[:3] for line in lines] == [b"503", b"500", b"503", b"421"]
    assert lines[-1] == str(TOO_MANY_ERRORS).encode()
