"""Accounts live in NATS KV: `relais account add/list/disable/enable` act on running ingresses
without a restart, and the config file only seeds what KV does not have yet."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.js.kv import KeyValue

from services.core.accounts import encode_account, hash_password
from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ACCOUNTS_BUCKET
from services.ingress.accounts import get_account, set_disabled, update_account
from services.ingress.replies import AUTH_INVALID, AUTH_OK, AUTH_UNAVAILABLE
from tests.integration.ingress.helpers import client, in_thread, plain, reply
from tests.support.relais import ACCOUNT, PASSWORD, REPO, message, password_hash


def relais(*args: str, nats_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "account", *args, "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )


def _auth(address: tuple[str, int], user: str, password: str) -> tuple[int, bytes]:
    with client(address) as smtp:
        return smtp.docmd("AUTH", f"PLAIN {plain(user, password)}")


async def _eventually(check: Callable[[], Any], expected: Any) -> None:
    got = None
    for _ in range(50):
        got = await check()
        if got == expected:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected {expected!r}, last got {got!r}")


async def test_account_add_disable_enable_without_restart(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats
) -> None:
    ingress = await make_ingress()
    url = nats_server.url
    added = await in_thread(
        relais,
        "add",
        "newbie",
        "--domain",
        "new.test",
        "--password",
        "s3cret",
        "--max-per-hour",
        "50",
        nats_url=url,
    )
    assert added.returncode == 0, added.stderr
    await _eventually(lambda: in_thread(_auth, ingress.smtp_address, "newbie", "s3cret"), reply(AUTH_OK))

    listed = await in_thread(relais, "list", nats_url=url)
    assert "newbie" in listed.stdout and "50/h" in listed.stdout and ACCOUNT in listed.stdout

    # A session authenticated before the account is disabled cannot send afterwards either.
    def open_session() -> Any:
        smtp = client(ingress.smtp_address)
        smtp.login("newbie", "s3cret")
        return smtp

    def open_transaction() -> Any:
        smtp = open_session()
        smtp.mail("x@new.test")
        smtp.rcpt("someone@alpha.test")
        return smtp

    session = await in_thread(open_session)
    # ... nor can one whose MAIL FROM was accepted before: DATA asks again.
    midway = await in_thread(open_transaction)
    try:
        assert (await in_thread(relais, "disable", "newbie", nats_url=url)).returncode == 0
        await _eventually(
            lambda: in_thread(_auth, ingress.smtp_address, "newbie", "s3cret"), reply(AUTH_INVALID)
        )
        code, _ = await in_thread(session.mail, "x@new.test")
        assert code == 535
        code, _ = await in_thread(midway.data, message())
        assert code == 535
    finally:
        await in_thread(session.close)
        await in_thread(midway.close)

    assert (await in_thread(relais, "enable", "newbie", nats_url=url)).returncode == 0
    await _eventually(lambda: in_thread(_auth, ingress.smtp_address, "newbie", "s3cret"), reply(AUTH_OK))
    assert (await in_thread(relais, "disable", "nobody", nats_url=url)).returncode == 1


async def test_config_accounts_seed_kv_but_do_not_override_it(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats
) -> None:
    first = await make_ingress()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        seeded = await get_account(js, ACCOUNT)
        assert seeded == AccountConfig(password_hash=password_hash(), domains=["acme.test"], pool="default")
        await set_disabled(js, ACCOUNT, True)
    finally:
        await nc.close()
    # A replica started later with the same config file must not re-enable the account.
    second = await make_ingress()
    for stack in (first, second):
        await _eventually(
            lambda s=stack: in_thread(_auth, s.smtp_address, ACCOUNT, PASSWORD), reply(AUTH_INVALID)
        )

    def send_with_cached_auth() -> int:
        with client(second.smtp_address) as smtp:
            return smtp.docmd("AUTH", f"PLAIN {plain(ACCOUNT, PASSWORD)}")[0]

    assert await in_thread(send_with_cached_auth) == 535


async def test_a_change_written_meanwhile_is_kept_not_overwritten(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `relais account passwd` reads the record, and `relais account disable` (another operator,
    # another host) writes it before passwd writes back: both changes must stay.
    await make_ingress()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        real_update = KeyValue.update
        interleaved: list[int] = []

        async def update(kv: KeyValue, key: str, value: bytes, last: int | None = None) -> int:
            if not interleaved:
                interleaved.append(await kv.put(key, encode_account(await disabled(js))))
            return await real_update(kv, key, value, last=last)

        monkeypatch.setattr(KeyValue, "update", update)
        new = hash_password("new-secret")
        changed = await update_account(js, ACCOUNT, lambda a: dataclasses.replace(a, password_hash=new))
        assert interleaved, "the disable was written between the read and the write"
        assert changed is not None and changed.disabled and changed.password_hash == new
        assert await get_account(js, ACCOUNT) == changed
    finally:
        await nc.close()


async def disabled(js: Any) -> AccountConfig:
    account = await get_account(js, ACCOUNT)
    assert account is not None
    return dataclasses.replace(account, disabled=True)


async def test_one_invalid_record_does_not_hide_the_other_accounts(
    make_ingress: Callable[..., Any], nats_server: EmbeddedNats
) -> None:
    await make_ingress()
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(ACCOUNTS_BUCKET)
        await kv.put("broken", b'{"password_hash": "plain"}')
    finally:
        await nc.close()
    listed = await in_thread(relais, "list", nats_url=nats_server.url)
    assert listed.returncode == 0 and ACCOUNT in listed.stdout and "broken" not in listed.stdout


async def test_until_the_accounts_are_read_auth_is_temporarily_refused(
    make_ingress: Callable[..., Any],
) -> None:
    # A replica whose KV read is slow at start knows only the config file's accounts, which may
    # still list one an operator disabled since: it answers 454, and the client tries again.
    ingress = await make_ingress()
    store = ingress.ingress.accounts
    store.loaded.clear()
    assert await in_thread(_auth, ingress.smtp_address, ACCOUNT, PASSWORD) == reply(AUTH_UNAVAILABLE)
    store.loaded.set()
    assert await in_thread(_auth, ingress.smtp_address, ACCOUNT, PASSWORD) == reply(AUTH_OK)
