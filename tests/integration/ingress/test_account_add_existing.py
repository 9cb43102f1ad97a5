"""`relais account add` on a name that has an account refuses (exit 1, one line on stderr) and
leaves the account as it was, unless told `--replace`: a name typed by mistake must not lock its
customer out, nor hand its domains to other credentials (`useradd` refuses an existing user too).
The record is written with a KV create, so of two admins adding one name at once only one wins."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats

from services.core.accounts import verify_password
from services.core.bus import Bus
from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import ACCOUNTS_BUCKET
from services.ingress.accounts import create_account, get_account
from tests.integration.ingress.test_accounts import relais
from tests.support.relais import ACCOUNT, make_config, relais_cli, run_cli


async def stored(nats_url: str, name: str) -> AccountConfig | None:
    nc = await nats.connect(nats_url)
    try:
        return await get_account(nc.jetstream(), name)
    finally:
        await nc.close()


def assert_exists_refusal(run: subprocess.CompletedProcess[str], name: str, where: str) -> None:
    assert run.returncode == 1, run
    assert run.stdout == "" and "Traceback" not in run.stderr, run
    (line,) = run.stderr.splitlines()
    assert f"account {name} already exists" in line and where in line and "--replace" in line, line


async def test_adding_a_name_that_has_an_account_changes_nothing_without_replace(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    url = nats_server.url
    first = ("add", "shop", "--domain", "shop.test", "--password", "the shop's password")
    assert (await asyncio.to_thread(relais, *first, nats_url=url)).returncode == 0
    before = await stored(url, "shop")
    assert before is not None

    typo = ("add", "shop", "--domain", "other.test", "--password", "someone else's password")
    assert_exists_refusal(await asyncio.to_thread(relais, *typo, nats_url=url), "shop", "in KV")
    assert await stored(url, "shop") == before, "the customer's password and domains stay"

    replaced = await asyncio.to_thread(relais, *typo, "--replace", nats_url=url)
    assert replaced.returncode == 0, replaced.stderr
    after = await stored(url, "shop")
    assert after is not None and after.domains == ["other.test"]
    assert verify_password("someone else's password", after.password_hash)


async def test_a_name_in_the_config_file_is_refused_before_it_is_seeded(
    topology_bus: Bus, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Before an ingress seeds KV from the file, a record written by `add` would win over the
    file's account for good (seeding never overwrites): the same mistake, found in the file."""
    config = make_config(nats_url=nats_server.url)
    args = ("account", "add", ACCOUNT, "--password", "a new password")
    assert_exists_refusal(await asyncio.to_thread(run_cli, config, tmp_path, *args), ACCOUNT, "config file")
    assert await stored(nats_server.url, ACCOUNT) is None, "nothing written"

    replaced = await asyncio.to_thread(run_cli, config, tmp_path, *args, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    written = await stored(nats_server.url, ACCOUNT)
    assert written is not None and verify_password("a new password", written.password_hash)


async def test_two_admins_adding_one_name_at_once_cannot_both_succeed(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    passwords = [f"password of admin {i}" for i in range(3)]
    runs = await asyncio.gather(
        *(
            relais_cli("account", "add", "race", "--password", pw, nats_url=nats_server.url)
            for pw in passwords
        )
    )
    succeeded = [pw for pw, (status, _) in zip(passwords, runs, strict=True) if status == 0]
    assert len(succeeded) == 1, runs
    assert all(status == 1 and "already exists" in out for status, out in runs if status != 0), runs
    account = await stored(nats_server.url, "race")
    assert account is not None and verify_password(succeeded[0], account.password_hash)


async def test_create_account_writes_only_where_no_record_is(topology_bus: Bus) -> None:
    """The write itself, without the command's early look: KV refuses a second create of a key,
    however close together they come, and takes one again once the record was deleted."""
    js = topology_bus.js
    accounts = [
        AccountConfig(password_hash=f"scrypt$1$1$1$salt{i}$digest", domains=[f"d{i}.test"]) for i in range(5)
    ]
    created = await asyncio.gather(*(create_account(js, "contended", a) for a in accounts))
    assert created.count(True) == 1, created
    assert await get_account(js, "contended") == accounts[created.index(True)]

    kv = await js.key_value(ACCOUNTS_BUCKET)
    await kv.delete("contended")
    assert await create_account(js, "contended", accounts[0])
    assert await get_account(js, "contended") == accounts[0]
