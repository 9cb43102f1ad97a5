"""The per-user AUTH lockout stops guessing spread over many addresses, but must not let a guesser
lock the account's owner out: an address that logged in as the user recently is spared, on every
replica, while addresses never seen with that user stay locked."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from typing import Any

from services.ingress.replies import AUTH_INVALID, AUTH_OK, AUTH_THROTTLED
from tests.integration.ingress.helpers import in_thread, plain, reply
from tests.support.relais import ACCOUNT, PASSWORD

LOCKOUT = 600.0
GUESSER, OWNER, STRANGER = "127.0.0.21", "127.0.0.22", "127.0.0.23"


def _auth_plain_from(source: str, address: tuple[str, int], password: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*address, timeout=15, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.test")
        return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, password)}")


async def test_the_owner_s_address_is_not_locked_out_by_someone_else_s_guesses(
    make_ingress: Callable[..., Any],
) -> None:
    settings = {"auth_max_failures": 3, "auth_lockout": LOCKOUT}
    one = await make_ingress(ingress=settings)
    two = await make_ingress(ingress=settings)
    if time.time() % LOCKOUT > LOCKOUT - 20:  # the whole scenario inside one lockout window
        await asyncio.sleep(LOCKOUT - time.time() % LOCKOUT + 0.1)

    assert await in_thread(_auth_plain_from, OWNER, one.smtp_address, PASSWORD) == reply(AUTH_OK)
    for n in range(3):
        answer = await in_thread(_auth_plain_from, GUESSER, one.smtp_address, f"guess-{n}")
        assert answer == reply(AUTH_INVALID)

    # The owner's address logged in before (on another replica): its right password still works.
    assert await in_thread(_auth_plain_from, OWNER, two.smtp_address, PASSWORD) == reply(AUTH_OK)
    # An address never seen with this user is locked, right password or not: that is what stops
    # guesses spread over many addresses.
    assert await in_thread(_auth_plain_from, STRANGER, two.smtp_address, PASSWORD) == reply(AUTH_THROTTLED)
    # The guesser's own address stays locked by its per-IP count.
    assert await in_thread(_auth_plain_from, GUESSER, one.smtp_address, PASSWORD) == reply(AUTH_THROTTLED)
