"""The spine's stack and zone, plus what the bounce scenarios share: VERP settings, inbound
publishing (the ingress's real contract), suppression look-ups, waiting for consumers and for a
settled pipeline (webhooks included), DSN windows held open, and a webhook receiver on loopback
that checks signatures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.js import JetStreamContext

from services.bounce.hold import HoldStore
from services.bounce.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookDispatcher, verify_signature
from services.core.bus import Bus, connect, inbox_prefix, is_kv_delete, leader_last
from services.core.config import AccountConfig, Config, ListenerConfig
from services.core.embedded import free_port
from services.core.envelope import BodyRef, Envelope, new_message_id
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import (
    BOUNCE_CONSUMER,
    BOUNCE_HOLD_BUCKET,
    BOUNCE_STREAM,
    DELIVER_STREAM,
    EVENTS_STREAM,
    ROUTE_STREAM,
    ROUTER_CONSUMER,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    VERDICT_CONSUMER,
    delivery_consumer,
    inbound_subject,
    kv_stream,
    kv_subject,
    retry_filters,
    webhooks_binding,
)
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
    await mail_over_smtp(inbound, return_path, postfix_dsn(to=return_path, recipient=recipient))


async def mail_over_smtp(inbound: tuple[str, int], rcpt: str, raw: bytes) -> None:
    """Any message to the inbound listener, from the null sender as bounces and automatic
    replies come (RFC 3834)."""

    def send() -> None:
        with smtplib.SMTP(*inbound, timeout=30) as client:
            client.ehlo("mx.alpha.test")
            client.sendmail("", [rcpt], raw)

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


# Where a notice's DSN goes once its window is flushed, in order: the consumers that have
# nothing left when every DSN (and every job) due so far has reached its MX. The test stacks
# have one pool, default.
_PIPELINE = (
    (BOUNCE_STREAM, BOUNCE_CONSUMER),
    (SUBMIT_STREAM, SUBMIT_CONSUMER),
    (ROUTE_STREAM, ROUTER_CONSUMER),
    (DELIVER_STREAM, VERDICT_CONSUMER),
    (DELIVER_STREAM, delivery_consumer("default")),
)


async def wait_settled(
    nats_url: str,
    *,
    retries: bool = True,
    webhooks: Iterable[str] = (),
    timeout: float = 30.0,  # noqa: ASYNC109
) -> None:
    """Until Relais has nothing left to do with what happened so far: every bounce notice handled,
    every DSN window flushed and finished (its DSN published first), every scheduled retry fired,
    the router and delivery idle. Every DSN and job due by now has then reached its MX, so
    "nothing more arrives" is a fact rather than a guess at a sleep long enough on a loaded
    machine. A test whose job is retried for ever passes `retries=False`: the retry scheduled
    next is then not waited for, only what is in a consumer or a DSN window.

    `webhooks`: accounts whose webhook (`webhooks-<account>`, which must exist) has to be done
    too: every event of theirs settled, acked after a 2xx or terminated, and none in hand or
    nak'ed for a retry. A nak'ed event stays ack-pending until it is delivered again and settled
    (nats-server keeps it among the consumer's pending for its whole delay), so an idle consumer
    has no POST left to make: a duplicate would already be at the receiver.

    Settled is one pass in pipeline order that finds every consumer idle and nothing held,
    while no stream of the pipeline (nor the events stream, with `webhooks`) took a message: a
    stage's output cannot then be on its way to a stage already looked at (a DSN refused by its
    MX comes back to bounce, say)."""
    hooks = [(EVENTS_STREAM, webhooks_binding(account).durable) for account in webhooks]
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        streams = sorted({stream for stream, _ in [*_PIPELINE, *hooks]})
        deadline = time.monotonic() + timeout
        while True:
            before = [(await js.stream_info(s)).state.last_seq for s in streams]
            busy = [d for s, d in _PIPELINE[:1] if not await _idle(js, s, d)]
            busy += await _unfinished_windows(js)
            busy += await _scheduled_retries(js) if retries else []
            # The webhooks last: every other stage publishes events.
            busy += [d for s, d in [*_PIPELINE[1:], *hooks] if not await _idle(js, s, d)]
            after = [(await js.stream_info(s)).state.last_seq for s in streams]
            if not busy and before == after:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not settled after {timeout}s: {busy or 'new messages'}")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _idle(js: JetStreamContext, stream: str, durable: str) -> bool:
    """Nothing left to deliver, and nothing delivered but not yet acked or terminated: in hand,
    nak'ed and waiting out its delay, or past ack_wait and due again (nats-server counts all three
    in num_ack_pending). num_redelivered, those delivered again and unsettled, is a part of that;
    asked for too, so that no redelivery in flight depends on how the server counts."""
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0


async def _unfinished_windows(js: JetStreamContext) -> list[str]:
    """The hold bucket's window records and held notices (services.bounce.hold): a window is
    finished, its DSN published, once both are gone. The delay-warning claims stay."""
    return [key for key in await _live_keys(js, BOUNCE_HOLD_BUCKET) if key.startswith(("w.", "n."))]


async def _scheduled_retries(js: JetStreamContext) -> list[str]:
    """The subjects of the retry schedules stored now; the server purges one when it fires."""
    stored = []
    for stream, subject_filter in retry_filters():
        info = await js.stream_info(stream, subjects_filter=subject_filter)
        stored += [subject for subject, count in (info.state.subjects or {}).items() if count]
    return stored


async def held_keys(nats_url: str) -> list[str]:
    """Live keys of the hold bucket: empty once every window has finished."""
    nc = await nats.connect(nats_url)
    try:
        return await _live_keys(nc.jetstream(), BOUNCE_HOLD_BUCKET)
    finally:
        await nc.close()


async def _live_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys of a bucket that have a value, from its stream's subjects and their last
    messages. Not KeyValue.keys(): nats-py's watcher can end the listing before it read the
    keys the server already sent, and a check that finds no key then passes for a wrong reason."""
    stream, prefix = kv_stream(bucket), kv_subject(bucket, "")
    info = await js.stream_info(stream, subjects_filter=f"{prefix}>")
    live = []
    for subject in info.state.subjects or {}:
        last = await leader_last(js, stream, subject)
        if last is not None and not is_kv_delete(last):
            live.append(subject.removeprefix(prefix))
    return sorted(live)


@dataclass
class HeldWindows:
    """What `hold_dsn_windows` waits for; `release()` lets windows held for the test close."""

    notices: int
    joined: set[str] = field(default_factory=set)
    all_joined: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


def hold_dsn_windows(
    monkeypatch: pytest.MonkeyPatch, notices: int, *, until_released: bool = False, longest: float = 20.0
) -> HeldWindows:
    """Keep every DSN window open past `bounce.dsn_window` until `notices` notices have joined
    (and, `until_released`, until the test calls `release()`); after `longest` seconds the flush
    goes on regardless, and the test's own checks say what was missing.

    The windows of these tests last 1-3 s; on a loaded machine a domain job's notice can come
    later than that and rightly get a DSN of its own. A test about what one window reports holds
    it, so it never depends on the machine's speed; a test about a notice that comes after its
    window closed must not. Every bounce replica of the process is held alike."""
    join, close = HoldStore.join, HoldStore.close
    held = HeldWindows(notices)
    if not until_released:
        held.release()

    async def counts_joins(self: HoldStore, message_id: str, notice: str, *args: Any, **kwargs: Any) -> Any:
        joined = await join(self, message_id, notice, *args, **kwargs)
        held.joined.add(notice)
        if len(held.joined) >= notices:
            held.all_joined.set()
        return joined

    async def closes_when_held_no_more(self: HoldStore, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(longest):
                await held.all_joined.wait()
                await held.released.wait()
        return await close(self, *args, **kwargs)

    monkeypatch.setattr(HoldStore, "join", counts_joins)
    monkeypatch.setattr(HoldStore, "close", closes_when_held_no_more)
    return held


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
async def replica(config: Config, name: str) -> AsyncIterator[WebhookDispatcher]:
    """A bounce replica's webhook posting alone, with a connection of its own, for the block;
    yields its dispatcher, whose account records say what it posts and signs with."""
    bus: Bus = await connect(config.nats, name)
    stop = asyncio.Event()
    dispatcher = WebhookDispatcher(config, bus)
    running = asyncio.create_task(dispatcher.run(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        await running
        await bus.close()
