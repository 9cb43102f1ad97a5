"""Webhooks follow the account records in KV, as authentication and routing do: `relais account
webhook` and `relais account add --webhook-url` take effect on a running cluster, without a
restart, against a real HTTP receiver on loopback, real SMTP and a real nats-server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from services.bounce.webhooks import WebhookDispatcher
from services.core.config import Config
from services.core.embedded import EmbeddedNats
from services.core.runtime import start_bus
from services.core.topology import ACCOUNTS_BUCKET, EVENTS_STREAM, kv_stream, webhooks_binding
from services.ingress.accounts import get_account, seed_accounts
from tests.integration.bounce.conftest import Receiver, wait_accepted, wait_settled, webhook_account
from tests.support.nats_delay_proxy import DelayingNatsProxy
from tests.support.relais import ACCOUNT, asubmit, make_config, message, run_cli, wait_for_events


async def account_cli(config: Config, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, config, workdir, "account", *args)


def printed_secret(stdout: str) -> str:
    found = re.search(r"^webhook secret: (\S+)$", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


async def consumer_exists(nats_url: str, account: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().consumer_info(EVENTS_STREAM, webhooks_binding(account).durable)
        return True
    except NotFoundError:
        return False
    finally:
        await nc.close()


async def test_a_webhook_set_on_a_running_cluster_is_posted_and_can_be_re_pointed(
    make_stack, make_sink, receiver: Receiver, tmp_path: Path
) -> None:
    stack = await make_stack()  # the account has no webhook in the config file
    make_sink("127.0.0.2")
    set_up = await account_cli(stack.config, tmp_path, "webhook", ACCOUNT, "--url", receiver.url)
    assert set_up.returncode == 0, set_up.stderr
    receiver.secret = printed_secret(set_up.stdout)  # generated: none was given

    assert (await asubmit(stack.smtp_address, recipients=["a@alpha.test"], data=message()))[0] == 250
    await wait_accepted(receiver, 2)
    with receiver.lock:
        assert {e["event"] for e in receiver.accepted} == {"accepted", "delivered"}
        assert receiver.bad_signatures == 0

    # A new URL keeps the secret, so receivers need not change their verification with it.
    moved = await account_cli(stack.config, tmp_path, "webhook", ACCOUNT, "--url", f"{receiver.url}?moved=1")
    assert moved.returncode == 0, moved.stderr
    assert "webhook secret" not in moved.stdout
    assert (await asubmit(stack.smtp_address, recipients=["b@alpha.test"], data=message()))[0] == 250
    deadline = time.monotonic() + 30
    while not any(p.endswith("?moved=1") for p in receiver.paths):
        assert time.monotonic() < deadline, receiver.paths
        await asyncio.sleep(0.1)
    with receiver.lock:
        assert receiver.bad_signatures == 0


@pytest.fixture
def dispatchers(monkeypatch: pytest.MonkeyPatch) -> list[WebhookDispatcher]:
    """Every webhook dispatcher made in this process from now on: the stacks' bounce replicas'."""
    made: list[WebhookDispatcher] = []
    init = WebhookDispatcher.__init__

    def recorded(self: WebhookDispatcher, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(WebhookDispatcher, "__init__", recorded)
    return made


async def test_a_removed_webhook_is_no_longer_posted_and_its_consumer_goes(
    make_stack,
    make_sink,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dispatchers: list[WebhookDispatcher],
) -> None:
    # Seeded from the config file; the record in KV, changed by the operator, is what counts.
    stack = await make_stack(accounts=webhook_account(receiver.url))
    make_sink("127.0.0.2")
    assert (await asubmit(stack.smtp_address, recipients=["a@alpha.test"], data=message()))[0] == 250
    await wait_accepted(receiver, 2)
    assert dispatchers and all(ACCOUNT in d.webhook_accounts() for d in dispatchers)

    cleared = await account_cli(stack.config, tmp_path, "webhook", ACCOUNT, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert not await consumer_exists(stack.config.nats.url, ACCOUNT)
    with receiver.lock:
        posted = len(receiver.accepted)

    assert (await asubmit(stack.smtp_address, recipients=["b@alpha.test"], data=message()))[0] == 250
    await wait_for_events(stack.config.nats.url, "delivered", 2)
    # Until no bounce replica posts the account's events any more (each has read the record: a
    # batch of them it fetched goes back unposted, and their posting loop ends) and Relais has
    # nothing left to do: the message's events are all out, no consumer to post them, none to come.
    deadline = time.monotonic() + 10
    while any(ACCOUNT in d.webhook_accounts() for d in dispatchers):
        assert time.monotonic() < deadline, "a bounce replica still posts the cleared webhook"
        await asyncio.sleep(0.05)
    await wait_settled(stack.config.nats.url)
    with receiver.lock:
        assert len(receiver.accepted) == posted
    assert not await consumer_exists(stack.config.nats.url, ACCOUNT)

    # A bounce replica started later with the same file says that the file's webhook is not used.
    with caplog.at_level(logging.WARNING, logger="services.bounce.webhooks"):
        await make_stack(services=("bounce",), accounts=webhook_account(receiver.url))
        deadline = time.monotonic() + 10
        while "differs from the account record" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.1)


async def test_an_account_added_with_a_webhook_has_its_first_messages_posted(
    make_stack, make_sink, receiver: Receiver, tmp_path: Path
) -> None:
    stack = await make_stack()
    make_sink("127.0.0.2")
    added = await account_cli(
        stack.config,
        tmp_path,
        "add",
        "newco",
        "--domain",
        "newco.test",
        "--password",
        "newco-password",
        "--webhook-url",
        receiver.url,
    )
    assert added.returncode == 0, added.stderr
    receiver.secret = printed_secret(added.stdout)
    # Made by the command itself: the events of the account's first message are kept for it.
    assert await consumer_exists(stack.config.nats.url, "newco")

    deadline = time.monotonic() + 30
    while True:  # until the ingress replicas have read the new account
        try:
            code, _ = await asubmit(
                stack.smtp_address,
                sender="news@newco.test",
                recipients=["a@alpha.test"],
                data=message(sender="news@newco.test"),
                user="newco",
                password="newco-password",
            )
            break
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert code == 250
    await wait_accepted(receiver, 2)
    with receiver.lock:
        assert {e["account"] for e in receiver.accepted} == {"newco"}
        assert receiver.bad_signatures == 0


@pytest.fixture
async def seeded(nats_server: EmbeddedNats) -> Config:
    """A config whose account is in KV, as a running ingress leaves it."""
    config = make_config(nats_url=nats_server.url)
    bus = await start_bus(config, "test-topology", attempts=5)
    try:
        await seed_accounts(await bus.js.key_value(ACCOUNTS_BUCKET), config.accounts)
    finally:
        await bus.close()
    return config


async def stored_webhook(config: Config) -> tuple[str, str]:
    bus = await start_bus(config, "test-read", attempts=5)
    try:
        account = await get_account(bus.js, ACCOUNT)
        assert account is not None
        return account.webhook_url, account.webhook_secret
    finally:
        await bus.close()


async def test_a_replica_whose_records_come_after_the_watch_s_end_marker_still_compares_its_file(
    seeded: Config, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """On a loaded machine the stored records can reach a starting replica after nats-py's
    "end of stored values" marker (nats-io/nats.py#842); the proxy makes that order certain.
    The record (without a webhook) must still be what the file's webhook is compared with."""
    async with DelayingNatsProxy(seeded.nats.url, kv_stream(ACCOUNTS_BUCKET), 0.8) as proxy:
        config = dataclasses.replace(
            seeded,
            nats=dataclasses.replace(seeded.nats, url=proxy.url),
            accounts=webhook_account(receiver.url),
        )
        bus = await start_bus(config, "test-bounce", attempts=5)
        dispatcher, stop = WebhookDispatcher(config, bus), asyncio.Event()
        with caplog.at_level(logging.WARNING, logger="services.bounce.webhooks"):
            running = asyncio.create_task(dispatcher.run(stop))
            try:
                deadline = time.monotonic() + 20
                while dispatcher.webhook_accounts():  # until the record overrides the file
                    assert time.monotonic() < deadline, "the record never reached the replica"
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await running
                await bus.close()
    assert f"account {ACCOUNT}: the webhook in the config file differs" in caplog.text


async def test_webhook_settings_are_checked_and_a_url_password_is_not_listed(
    seeded: Config, tmp_path: Path
) -> None:
    for args, code in [
        (("--url", "ftp://hooks.example/relais"), 2),
        (("--url", "http://hooks.example/relais", "--secret", "too-short"), 2),
        (("--secret", "a-secret-of-enough-length"), 2),  # no webhook to re-key yet
        (("--clear", "--new-secret"), 2),
    ]:
        refused = await account_cli(seeded, tmp_path, "webhook", ACCOUNT, *args)
        assert refused.returncode == code, (args, refused.stdout, refused.stderr)
        assert await stored_webhook(seeded) == ("", "")
    ghost = await account_cli(seeded, tmp_path, "webhook", "ghost", "--url", "http://hooks.example/")
    assert ghost.returncode == 1 and "no account ghost" in ghost.stderr

    url = "https://relais:hunter2-basic@hooks.example/relais"
    given = "a-secret-of-enough-length"
    set_up = await account_cli(seeded, tmp_path, "webhook", ACCOUNT, "--url", url, "--secret", given)
    assert set_up.returncode == 0, set_up.stderr
    assert "webhook secret" not in set_up.stdout
    assert await stored_webhook(seeded) == (url, given)

    rekeyed = await account_cli(seeded, tmp_path, "webhook", ACCOUNT, "--new-secret")
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert await stored_webhook(seeded) == (url, printed_secret(rekeyed.stdout))

    for shown in (
        await account_cli(seeded, tmp_path, "list"),
        await account_cli(seeded, tmp_path, "webhook", ACCOUNT),
    ):
        assert shown.returncode == 0, shown.stderr
        assert "https://relais:***@hooks.example/relais" in shown.stdout
        assert "hunter2" not in shown.stdout


async def test_a_webhook_url_that_could_never_be_posted_to_is_refused_where_it_is_set(
    seeded: Config, tmp_path: Path
) -> None:
    """It was stored, and then every POST failed at run time, retried for as long as the events
    stream kept the account's events; the command refuses it with a usage error instead."""
    for url, why in [
        ("https://hooks.example.test:99999/x", "webhook_url: port '99999' is not a number from 1 to 65535"),
        ("https://:8443/relais", "webhook_url: no host to post to"),
    ]:
        refused = await account_cli(seeded, tmp_path, "webhook", ACCOUNT, "--url", url)
        assert refused.returncode == 2, (url, refused.stdout, refused.stderr)
        assert why in refused.stderr
        assert await stored_webhook(seeded) == ("", "")
        added = await account_cli(
            seeded, tmp_path, "add", "newco", "--password", "newco-password", "--webhook-url", url
        )
        assert added.returncode == 2, (url, added.stdout, added.stderr)
        assert why in added.stderr
        assert "newco" not in (await account_cli(seeded, tmp_path, "list")).stdout
