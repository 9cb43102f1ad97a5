"""Security regression: an account whose stored hash lost most of its digest is no account that
one guess in 256 opens. AUTH with a wrong password that matches the cut digest is 535."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.core.config import AccountConfig
from services.ingress.replies import AUTH_INVALID
from tests.integration.ingress.helpers import client, in_thread, plain, reply
from tests.support.relais import ACCOUNT, SENDER_DOMAIN
from tests.unit.test_password_hash_digest_length import COLLIDING_GUESS, ONE_OCTET


async def test_a_guess_matching_a_cut_digest_does_not_log_in(make_ingress: Callable[..., Any]) -> None:
    account = AccountConfig(password_hash=ONE_OCTET, domains=[SENDER_DOMAIN])
    ingress = await make_ingress(accounts={ACCOUNT: account})

    def auth() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, COLLIDING_GUESS)}")

    assert await in_thread(auth) == reply(AUTH_INVALID)
