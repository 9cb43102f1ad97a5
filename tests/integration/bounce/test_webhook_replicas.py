"""Two bounce replicas post the webhooks side by side, and one of them is replaced midway (a
rolling restart): every event of each account reaches its own receiver, signed with that
account's secret and never another's, and none is taken twice. Real nats-server, real HTTP
receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from services.bounce.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from services.core.bus import Bus
from services.core.config import AccountConfig, BounceConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.events import event_for, publish_event
from services.core.topology import ensure_topology
from tests.integration.bounce.conftest import http_receiver, replica, wait_settled
from tests.support.relais import an_envelope

SECRETS = {"acme": "whsec-acme-0123456789", "globex": "whsec-globex-0123456789"}
EVENTS_PER_ACCOUNT = 20


class Receivers:
    """One URL per account (/hook/<account>); a POST is taken (200) only when its signature
    verifies with that account's secret; the first `fail_first` POSTs get a 503."""

    def __init__(self, fail_first: int) -> None:
        self.lock = threading.Lock()
        self.fail_first = fail_first
        self.requests = 0
        self.taken: dict[str, list[dict]] = {name: [] for name in SECRETS}
        self.forged: list[str] = []  # paths whose signature did not verify
        self.url = ""


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    state = Receivers(fail_first=3)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            account = self.path.rsplit("/", 1)[-1]
            ok = verify_signature(
                SECRETS[account], self.headers[TIMESTAMP_HEADER], body, self.headers[SIGNATURE_HEADER]
            )
            with state.lock:
                state.requests += 1
                failing = state.requests <= state.fail_first
                if not ok:
                    state.forged.append(self.path)
                elif not failing:
                    state.taken[account].extend(json.loads(body))
            self.send_response(200 if ok and not failing else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http_receiver(Handler) as base:
        state.url = f"{base}/hook"
        yield state


async def until_taken(receivers: Receivers, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        with receivers.lock:
            taken = sum(len(entries) for entries in receivers.taken.values())
        if taken >= count:
            return
        assert time.monotonic() < deadline, f"{taken} of {count} events taken after {timeout}s"
        await asyncio.sleep(0.05)


async def test_two_replicas_and_a_restart_post_every_event_once_with_its_own_secret(
    nats_server: EmbeddedNats, topology_bus: Bus, receivers: Receivers
) -> None:
    config = Config(
        nats=NatsConfig(url=nats_server.url),
        accounts={
            name: AccountConfig(
                password_hash="-", webhook_url=f"{receivers.url}/{name}", webhook_secret=secret
            )
            for name, secret in SECRETS.items()
        },
        bounce=BounceConfig(webhook_batch=3, webhook_retry_base=0.2, webhook_retry_max=0.5),
    )
    await ensure_topology(topology_bus.js, config)  # the consumers, as the services make them
    published: dict[str, set[str]] = {name: set() for name in SECRETS}

    async def publish(count: int) -> None:
        for _ in range(count):
            for name in SECRETS:
                env = an_envelope(account=name)
                rcpt = f"r{len(published[name])}@alpha.test"
                await publish_event(topology_bus, event_for("delivered", env, [rcpt]))
                published[name].add(rcpt)

    async with replica(config, "bounce-a"):
        async with replica(config, "bounce-b"):
            await publish(EVENTS_PER_ACCOUNT // 2)
            await until_taken(receivers, 1)  # posting under way, past the failing POSTs
        # bounce-b stopped (its batch in hand settled first); bounce-c takes its place.
        async with replica(config, "bounce-c"):
            await publish(EVENTS_PER_ACCOUNT // 2)
            # Until both webhooks have settled every event, while the replicas still run: a batch
            # nak'ed or unacked would be posted again before this returns, not after it.
            await wait_settled(nats_server.url, webhooks=SECRETS)

    with receivers.lock:
        assert receivers.requests > receivers.fail_first
        assert receivers.forged == [], "every POST signed with its own account's secret"
        for name, taken in receivers.taken.items():
            assert {e["email"] for e in taken} == published[name], f"every event of {name}"
            assert {e["account"] for e in taken} == {name}, "no event at another account's URL"
            ids = [e["event_id"] for e in taken]
            assert len(ids) == len(set(ids)) == EVENTS_PER_ACCOUNT, "none taken twice"
