"""AUTH PLAIN/LOGIN: right replies for wrong or malformed credentials, and a lockout that expires."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from services.ingress.replies import AUTH_BAD_BASE64, AUTH_INVALID, AUTH_MALFORMED, AUTH_OK, AUTH_THROTTLED
from tests.integration.ingress.helpers import client, hung_up, in_thread, plain, queued, reply
from tests.support.relais import ACCOUNT, PASSWORD, message


@pytest.fixture
async def ingress(make_ingress: Callable[..., Any]) -> Any:
    return await make_ingress(ingress={"auth_max_failures": 3, "auth_lockout": 3.0})


def _auth_plain(address: tuple[str, int], user: str, password: str) -> tuple[int, bytes]:
    with client(address) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(user, password)}")


async def test_plain_and_login_both_work(ingress: Any) -> None:
    def scenario() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            plain_reply = smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")
        with client(ingress.smtp_address) as smtp:
            smtp.user, smtp.password = ACCOUNT, PASSWORD
            login_reply = smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
            smtp.sendmail("news@acme.test", ["a@alpha.test"], message())
        return plain_reply, login_reply

    plain_reply, login_reply = await in_thread(scenario)
    assert plain_reply == reply(AUTH_OK) and login_reply == reply(AUTH_OK)
    assert len(await queued(ingress.config.nats.url)) == 1


async def test_wrong_password_and_unknown_user_are_535(ingress: Any) -> None:
    assert await in_thread(_auth_plain, ingress.smtp_address, ACCOUNT, "wrong") == reply(AUTH_INVALID)
    assert await in_thread(_auth_plain, ingress.smtp_address, "nobody", PASSWORD) == reply(AUTH_INVALID)


async def test_malformed_base64_is_501(ingress: Any) -> None:
    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            return [
                smtp.docmd("AUTH", "PLAIN not*base64"),
                smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"no-separators").decode()),
                smtp.docmd("AUTH", "LOGIN %%%"),
            ]

    bad_b64, unsplittable, bad_login = await in_thread(scenario)
    assert bad_b64 == reply(AUTH_BAD_BASE64) and bad_login == reply(AUTH_BAD_BASE64)
    assert unsplittable == reply(AUTH_MALFORMED)


async def test_repeated_failures_lock_out_ip_and_user_until_the_window_ends(ingress: Any) -> None:
    # Lockout windows are fixed (every replica derives the same key from the clock): start right
    # after a window boundary so all three failures land in the same 3 s window.
    await asyncio.sleep(3.0 - time.time() % 3.0 + 0.05)
    for _ in range(3):
        assert await in_thread(_auth_plain, ingress.smtp_address, ACCOUNT, "guess") == reply(AUTH_INVALID)

    def locked_attempt() -> tuple[tuple[int, bytes], bool]:
        with client(ingress.smtp_address) as smtp:
            answer = smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")
            closed = hung_up(smtp)
            return answer, closed

    # Even the right password is refused during the lockout, and the connection is dropped.
    answer, closed = await in_thread(locked_attempt)
    assert answer == reply(AUTH_THROTTLED) and closed
    # The lockout expires with its window (3 s here, 15 min by default).
    for _ in range(40):
        await asyncio.sleep(0.25)
        if await in_thread(_auth_plain, ingress.smtp_address, ACCOUNT, PASSWORD) == reply(AUTH_OK):
            break
    else:
        pytest.fail("lockout never expired")


async def test_lockout_holds_across_replicas(make_ingress: Callable[..., Any]) -> None:
    one = await make_ingress(ingress={"auth_max_failures": 2, "auth_lockout": 600.0})
    two = await make_ingress(ingress={"auth_max_failures": 2, "auth_lockout": 600.0})
    for _ in range(2):
        await in_thread(_auth_plain, one.smtp_address, "victim", "guess")
    assert await in_thread(_auth_plain, two.smtp_address, "victim", "guess") == reply(AUTH_THROTTLED)


async def _auth_plain_async(address: tuple[str, int], user: str, password: str) -> tuple[int, bytes]:
    # Not smtplib in threads: twenty blocking clients would fill the default executor that the
    # ingress (in this process) needs for its scrypt, and every check would wait for a timeout.
    smtp = aiosmtplib.SMTP(hostname=address[0], port=address[1], timeout=30, start_tls=False)
    await smtp.connect()
    try:
        await smtp.ehlo(hostname="client.test")
        answer = await smtp.execute_command(b"AUTH", b"PLAIN", plain(user, password).encode())
        return answer.code, answer.message.encode()
    finally:
        smtp.close()


async def test_concurrent_guesses_are_counted_before_they_are_checked(ingress: Any) -> None:
    # Twenty different passwords at once: each is counted before its scrypt, so no more than the
    # allowed three are ever checked, however many connections an attacker opens.
    await asyncio.sleep(3.0 - time.time() % 3.0 + 0.05)  # all within one lockout window
    answers = await asyncio.gather(
        *(_auth_plain_async(ingress.smtp_address, ACCOUNT, f"guess-{n}") for n in range(20))
    )
    assert answers.count(reply(AUTH_INVALID)) <= 3
    assert answers.count(reply(AUTH_THROTTLED)) == 20 - answers.count(reply(AUTH_INVALID))


async def test_a_burst_of_right_logins_is_not_throttled(ingress: Any) -> None:
    # A bulk sender opening many connections at once with the right password: they share one
    # check and one reservation, which is refunded, so none of them counts as a failure.
    address = ingress.smtp_address
    answers = await asyncio.gather(*(_auth_plain_async(address, ACCOUNT, PASSWORD) for _ in range(20)))
    assert answers == [reply(AUTH_OK)] * 20
    assert await _auth_plain_async(address, ACCOUNT, PASSWORD) == reply(AUTH_OK)
