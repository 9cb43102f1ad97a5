"""The spine's stack and zone, plus what the bounce scenarios share: VERP settings, inbound
publishing (the ingress's real contract), suppression look-ups, waiting for consumers, and a
webhook receiver on loopback that checks signatures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest

from services.bounce.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookDispatcher, verify_signature
from services.core.bus import Bus, connect, inbox_prefix
from services.core.config import AccountConfig, Config, ListenerConfig
from services.core.embedded import free_port
from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import inbound_subject
from tests.integration.spine.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    sender_mx,
    stack,
    zone,
)
from tests.support.bounce_samples import postfix_dsn
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, RelaisStack, password_hash, wait_listening

RETURN_DOMAIN = "bounces.relais.test"
SECRET = "verp-secret-0123456789"
VERP = {"verp": True, "return_path_domain": RETURN_DOMAIN, "verp_secrets": [SECRET]}
FBL_ADDRESS = f"fbl@{RETURN_DOMAIN}"


async def publish_inbound(nats_url: str, raw: bytes, recipients: list[str], sender: str = "") -> str:
    """What the ingress's inbound listener publishes for mail to our own domains. Its inboxes
    are named after the URL's user, as the services name theirs (deploy/k8s/base/nats.conf lets
    each user subscribe to its own only)."""
    nc = await nats.connect(nats_url, inbox_prefix=inbox_prefix(urlsplit(nats_url).username))
    try:
        bus = Bus(nc=nc, js=nc.jetstream(), publish_timeout=5.0)
        env = Envelope(
            id=new_message_id(),
            sender=sender,
            recipients=tuple(recipients),
            account="",
            sender_domain="",
            body=BodyRef(size=len(raw), inline=raw),
            kind="inbound",
        )
        await bus.publish(inbound_subject(), env.to_msgpack(), msg_id=env.id)
        return env.id
    finally:
        await nc.close()


async def stack_with_inbound_listener(
    make: Callable[..., Any], **sections: Any
) -> tuple[RelaisStack, tuple[str, int]]:
    """A stack with VERP on, a submission listener and an inbound (port-25-style) listener that
    takes mail for the return path domain (`make`: the make_stack fixture): the stack and the
    inbound listener's address."""
    submission = f"127.0.0.1:{free_port()}"
    inbound = ("127.0.0.1", free_port())
    made = await make(
        bounce=VERP,
        smtp_listen=submission,
        ingress={
            "listeners": [
                ListenerConfig(listen=submission, mode="submission"),
                ListenerConfig(listen=f"{inbound[0]}:{inbound[1]}", mode="inbound"),
            ],
            "local_domains": [RETURN_DOMAIN],
        },
        **sections,
    )
    wait_listening(inbound)
    return made, inbound


async def bounce_over_smtp(inbound: tuple[str, int], return_path: str, recipient: str) -> None:
    """What the recipient's MTA does days later: a DSN to the return path it was given."""

    def send() -> None:
        with smtplib.SMTP(*inbound, timeout=30) as client:
            client.ehlo("mx.alpha.test")
            client.sendmail("", [return_path], postfix_dsn(to=return_path, recipient=recipient))

    await asyncio.to_thread(send)


async def publish_submission(nats_url: str, env: Envelope) -> None:
    """What the ingress publishes for an accepted submission (router input)."""
    from services.core.topology import submit_subject

    nc = await nats.connect(nats_url)
    try:
        await Bus(nc=nc, js=nc.jetstream(), publish_timeout=5.0).publish(
            submit_subject(), env.to_msgpack(), msg_id=env.id
        )
    finally:
        await nc.close()


async def suppression_entry(nats_url: str, account: str, address: str) -> Suppression | None:
    nc = await nats.connect(nats_url)
    try:
        return await SuppressionList(nc.jetstream()).get(account, address)
    finally:
        await nc.close()


async def wait_consumed(nats_url: str, stream: str, durable: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Until the consumer has acked everything in its stream: its outputs are then published."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await js.consumer_info(stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{durable} still has work after {timeout}s")
    finally:
        await nc.close()


WEBHOOK_SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Receiver:
    """Answers 500 to the first `fail_first` POSTs, 200 after; records what it accepted."""

    fail_first: int = 0
    requests: int = 0
    accepted: list[dict] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    secret: str = WEBHOOK_SECRET  # what a signature must verify with
    paths: list[str] = field(default_factory=list)  # of the accepted POSTs


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = verify_signature(
                state.secret, self.headers[TIMESTAMP_HEADER], body, self.headers[SIGNATURE_HEADER]
            )
            with state.lock:
                state.requests += 1
                failing = state.requests <= state.fail_first
                if not ok:
                    state.bad_signatures += 1
                elif not failing:
                    state.accepted.extend(json.loads(body))
                    state.paths.append(self.path)
            self.send_response(500 if failing or not ok else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http_receiver(Handler) as base:
        state.url = f"{base}/hooks/relais"
        yield state


@contextlib.contextmanager
def http_receiver(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on loopback answering with `handler` in a thread of its own, for the
    lifetime of the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def webhook_account(url: str) -> dict[str, AccountConfig]:
    return {
        ACCOUNT: AccountConfig(
            password_hash=password_hash(),
            domains=[SENDER_DOMAIN],
            webhook_url=url,
            webhook_secret=WEBHOOK_SECRET,
        )
    }


async def wait_accepted(receiver: Receiver, count: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with receiver.lock:
            if len(receiver.accepted) >= count:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"receiver accepted {len(receiver.accepted)} of {count} entries")


@contextlib.asynccontextmanager
async def replica(config: Config, name: str) -> AsyncIterator[None]:
    """A bounce replica's webhook posting alone, with a connection of its own, for the block."""
    bus: Bus = await connect(config.nats, name)
    stop = asyncio.Event()
    running = asyncio.create_task(WebhookDispatcher(config, bus).run(stop))
    try:
        yield
    finally:
        stop.set()
        await running
        await bus.close()
