"""The bounce service's /metrics reports the lag of each account's webhook consumer, and its
readiness does not depend on those consumers (one account's receiver must not take pods out)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from services.core.config import AccountConfig, Config
from services.core.embedded import EmbeddedNats, free_port
from services.core.events import Event
from services.core.topology import ACCOUNTS_BUCKET, event_subject, webhooks_binding
from services.ingress.accounts import seed_accounts
from tests.integration.bounce.conftest import webhook_account
from tests.integration.observability.test_metrics_endpoint import aget, until_ready
from tests.support.prom import Samples, samples, value
from tests.support.relais import (
    ACCOUNT,
    ServiceProcess,
    config_to_toml,
    make_config,
    password_hash,
    run_cli,
)

QUIET_ACCOUNT = "quiet"  # an account without a webhook: no consumer, no lag to report
LAG = ("relais_consumer_pending", "relais_consumer_ack_pending")


async def _scrape_until(base: str, done: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 20
    while True:
        got = samples((await aget(f"{base}/metrics"))[1])
        if done(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.3)


def _lag(data: Samples, consumer: str) -> float:
    return sum(value(data, name, consumer=consumer) for name in LAG)


def _reported(data: Samples, consumer: str) -> bool:
    return any((name, frozenset({("consumer", consumer)})) in data for name in LAG)


def _bounce_process(
    nats_server: EmbeddedNats, tmp_path: Path, accounts: dict[str, AccountConfig], **sections: Any
) -> tuple[Config, ServiceProcess, str]:
    """`relais bounce` as its own process (not started), and the base URL of its /metrics."""
    port = free_port()
    config = make_config(
        nats_url=nats_server.url,
        accounts=accounts,
        telemetry={"http_listen": f"127.0.0.1:{port}"},
        **sections,
    )
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    return config, ServiceProcess("bounce", path, tmp_path), f"http://127.0.0.1:{port}"


async def test_bounce_metrics_report_each_webhook_consumers_lag_but_readiness_ignores_them(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    # A receiver where nothing listens: every POST fails, the account's events wait.
    dead_receiver = f"http://127.0.0.1:{free_port()}/hooks/relais"
    accounts = {
        **webhook_account(dead_receiver),
        QUIET_ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["quiet.test"]),
    }
    _, proc, base = _bounce_process(nats_server, tmp_path, accounts, bounce={"webhook_retry_base": 30.0})
    consumer = webhooks_binding(ACCOUNT).durable
    proc.start()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await until_ready(base, proc)  # the webhook consumer exists from here on (made at start)
        for i in range(3):
            event = Event("accepted", f"lag-{i}", ACCOUNT, [f"r{i}@alpha.test"])
            await js.publish(event_subject(ACCOUNT, "accepted"), event.to_json())

        after = await _scrape_until(base, lambda d: _lag(d, consumer) >= 3)
        assert _lag(after, consumer) == 3, proc.log()
        assert ("relais_stream_messages", frozenset({("stream", "RELAIS_EVENTS")})) in after
        assert not _reported(after, webhooks_binding(QUIET_ACCOUNT).durable)
        assert _reported(after, "bounce"), "the service's own consumers are still reported"

        # A webhook consumer gone (deleted by hand, or not made yet) is not a reason to take a
        # bounce pod out of service: its lag leaves the scrape, readiness stays.
        await js.delete_consumer(webhooks_binding(ACCOUNT).stream, consumer)
        status, body = await aget(f"{base}/readyz")
        assert status == 200, body
        gone = await _scrape_until(base, lambda d: not _reported(d, consumer))
        assert not _reported(gone, consumer)
    finally:
        await nc.close()
        proc.stop()


async def test_a_webhook_set_or_removed_with_relais_account_comes_and_goes_in_the_scrape(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    accounts = {QUIET_ACCOUNT: AccountConfig(password_hash=password_hash(), domains=["quiet.test"])}
    config, proc, base = _bounce_process(nats_server, tmp_path, accounts)
    consumer = webhooks_binding(QUIET_ACCOUNT).durable
    proc.start()
    nc = await nats.connect(nats_server.url)
    try:
        await until_ready(base, proc)
        # What the ingress does at its start: the config file's accounts written to KV.
        await seed_accounts(await nc.jetstream().key_value(ACCOUNTS_BUCKET), config.accounts)
        assert not _reported(samples((await aget(f"{base}/metrics"))[1]), consumer)

        url = f"http://127.0.0.1:{free_port()}/hooks/relais"
        webhook = ("account", "webhook", QUIET_ACCOUNT)
        set_up = await asyncio.to_thread(run_cli, config, tmp_path, *webhook, "--url", url)
        assert set_up.returncode == 0, set_up.stderr
        shown = await _scrape_until(base, lambda d: _reported(d, consumer))
        assert _reported(shown, consumer), proc.log()

        cleared = await asyncio.to_thread(run_cli, config, tmp_path, *webhook, "--clear")
        assert cleared.returncode == 0, cleared.stderr
        gone = await _scrape_until(base, lambda d: not _reported(d, consumer))
        assert not _reported(gone, consumer), proc.log()
    finally:
        await nc.close()
        proc.stop()
