"""Security regression: a new password ends what the old one opened. After `relais account passwd`
(a leaked password, say) a session authenticated with the old one must not go on sending, on any
replica: an attacker could otherwise hold one session open and keep sending for as long as he
likes. Its next MAIL is refused as unauthenticated; the owner may log in again with the new
password, in the same session, without the old login keeping a session slot."""

from __future__ import annotations

import dataclasses
import smtplib
from collections.abc import Callable
from typing import Any

import nats
import pytest

from services.core.accounts import hash_password
from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from services.ingress.accounts import update_account
from services.ingress.auth import PasswordChecker
from services.ingress.replies import AUTH_INVALID, AUTH_OK, AUTH_REQUIRED
from tests.integration.ingress.helpers import client, in_thread, login, plain, reply, settle
from tests.support.relais import ACCOUNT, PASSWORD, SENDER_DOMAIN, message, password_hash

NEW_PASSWORD = "a new password after a leak"


async def _change_password(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        new = hash_password(NEW_PASSWORD)
        await update_account(nc.jetstream(), ACCOUNT, lambda a: dataclasses.replace(a, password_hash=new))
    finally:
        await nc.close()


def _auth(address: tuple[str, int], password: str) -> tuple[int, bytes]:
    with client(address) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, password)}")


def _sent(smtp: smtplib.SMTP) -> tuple[int, bytes]:
    """One message in the session: MAIL's reply when refused, else the reply to DATA."""
    answer = smtp.mail("news@acme.test")
    if answer[0] != 250:
        smtp.rset()
        return answer
    smtp.rcpt("a@alpha.test")
    return smtp.data(message())


async def test_sessions_authenticated_with_an_old_password_send_no_more(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats
) -> None:
    account = AccountConfig(password_hash=password_hash(), domains=[SENDER_DOMAIN], max_sessions=5)
    one = await make_ingress(accounts={ACCOUNT: account})
    two = await make_ingress(accounts={ACCOUNT: account})

    def open_session(address: tuple[str, int]) -> smtplib.SMTP:
        smtp = client(address)
        login(smtp)
        assert _sent(smtp)[0] == 250
        return smtp

    first = await in_thread(open_session, one.smtp_address)
    second = await in_thread(open_session, two.smtp_address)
    try:
        await _change_password(nats_server.url)
        for stack in (one, two):  # both replicas have seen the change
            for _ in range(50):
                if await in_thread(_auth, stack.smtp_address, PASSWORD) == reply(AUTH_INVALID):
                    break
            else:
                raise AssertionError("the old password still works")

        assert await in_thread(_sent, first) == reply(AUTH_REQUIRED)
        assert await in_thread(_sent, second) == reply(AUTH_REQUIRED)

        # The owner logs in again with the new password; the old login's slot is given back.
        await in_thread(second.close)
        assert await in_thread(first.docmd, "AUTH", f"PLAIN {plain(ACCOUNT, NEW_PASSWORD)}") == reply(AUTH_OK)
        assert (await in_thread(_sent, first))[0] == 250
        assert one.ingress is not None
        sessions = one.ingress.sessions
        assert await settle(lambda: sessions.open_sessions(ACCOUNT) == 1), sessions.open_sessions(ACCOUNT)
    finally:
        await in_thread(first.close)
        await in_thread(second.close)


async def test_a_password_changed_while_it_is_checked_logs_nobody_in(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old password is checked (scrypt, tens of milliseconds) as the new one reaches the
    # replica: the session must not come out of it authenticated with the old one.
    ingress = await make_ingress()
    assert ingress.ingress is not None
    store = ingress.ingress.accounts
    real_check = PasswordChecker.check

    async def check_then_change(self: PasswordChecker, *args: Any, **kwargs: Any) -> bool | None:
        result = await real_check(self, *args, **kwargs)
        old = store.get(ACCOUNT)
        await _change_password(nats_server.url)
        assert await settle(lambda: store.get(ACCOUNT) != old)
        return result

    monkeypatch.setattr(PasswordChecker, "check", check_then_change)

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            answer = smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")
            return answer, _sent(smtp)

    answer, sent = await in_thread(session)
    assert answer == reply(AUTH_INVALID) and sent == reply(AUTH_REQUIRED)
