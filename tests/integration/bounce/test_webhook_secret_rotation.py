"""A webhook secret rotated with an overlap (`relais account webhook --new-secret --overlap`): while
it lasts, every POST carries in X-Relais-Signatures a signature under the previous secret and one
under the new, so a receiver switches secrets whenever it likes and no batch fails; a replica
started during the overlap signs alike (the overlap is in the account record in KV);
X-Relais-Signature stays one signature under the current secret; once the overlap ends only the
new secret signs, and a re-key without one ends an overlap at once. Real nats-server, the real
CLI, a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from services.bounce.webhooks import SIGNATURE_HEADER, SIGNATURES_HEADER, TIMESTAMP_HEADER, verify_signature
from services.core.bus import Bus
from services.core.config import AccountConfig, BounceConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.events import event_for, publish_event
from services.core.topology import ACCOUNTS_BUCKET, ensure_topology
from services.ingress.accounts import get_account, seed_accounts
from tests.integration.bounce.conftest import http_receiver, replica
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, an_envelope, password_hash, run_cli

OLD = "whsec-old-0123456789abcdef"


@dataclass(frozen=True)
class Post:
    timestamp: str
    body: bytes
    signature: str  # X-Relais-Signature
    signatures: str  # X-Relais-Signatures

    def signed_by(self, secret: str) -> bool:
        return verify_signature(secret, self.timestamp, self.body, self.signatures)


@dataclass
class Receiver:
    """Takes a POST (200) when X-Relais-Signatures verifies with the one secret it holds, as a
    receiver following the docs does; records every POST."""

    secret: str
    url: str = ""
    posts: list[Post] = field(default_factory=list)
    refused: list[Post] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def since(self, count: int) -> list[Post]:
        with self.lock:
            return self.posts[count:]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(secret=OLD)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            post = Post(
                self.headers[TIMESTAMP_HEADER],
                body,
                self.headers[SIGNATURE_HEADER],
                self.headers[SIGNATURES_HEADER] or "",
            )
            with state.lock:
                state.posts.append(post)
                ok = post.signed_by(state.secret)
                if not ok:
                    state.refused.append(post)
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http_receiver(Handler) as base:
        state.url = f"{base}/hooks/relais"
        yield state


@pytest.fixture
async def config(nats_server: EmbeddedNats, topology_bus: Bus, receiver: Receiver) -> Config:
    """The account with a webhook under OLD, in KV as a running ingress leaves it."""
    made = Config(
        nats=NatsConfig(url=nats_server.url),
        accounts={
            ACCOUNT: AccountConfig(
                password_hash=password_hash(),
                domains=[SENDER_DOMAIN],
                webhook_url=receiver.url,
                webhook_secret=OLD,
            )
        },
        bounce=BounceConfig(webhook_retry_base=0.2, webhook_retry_max=0.5),
    )
    await ensure_topology(topology_bus.js, made)  # the account's consumer, as the services make it
    await seed_accounts(await topology_bus.js.key_value(ACCOUNTS_BUCKET), made.accounts)
    return made


async def account_webhook(config: Config, workdir: Path, *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, config, workdir, "account", "webhook", ACCOUNT, *args)
    return done.returncode, done.stdout, done.stderr


def printed_secret(stdout: str) -> str:
    found = re.search(r"^webhook secret: (\S+)$", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


async def post_one(bus: Bus, receiver: Receiver) -> Post:
    """Publish an event of the account; the first POST that carries it."""
    rcpt = f"r{time.monotonic_ns()}@alpha.test"
    await publish_event(bus, event_for("delivered", an_envelope(rcpt), [rcpt]))
    deadline = time.monotonic() + 30
    while True:
        for post in receiver.since(0):
            if rcpt.encode() in post.body:
                return post
        assert time.monotonic() < deadline, f"no POST carried {rcpt}"
        await asyncio.sleep(0.05)


async def stored(bus: Bus) -> AccountConfig:
    account = await get_account(bus.js, ACCOUNT)
    assert account is not None
    return account


async def test_during_the_overlap_both_secrets_sign_and_the_receiver_switches_without_a_failure(
    topology_bus: Bus, receiver: Receiver, config: Config, tmp_path: Path
) -> None:
    async with replica(config, "bounce-a"):
        before = await post_one(topology_bus, receiver)
        assert before.signed_by(OLD)
        assert before.signatures == before.signature, "no rotation: the one signature, in both fields"

        code, out, err = await account_webhook(config, tmp_path, "--new-secret", "--overlap", "1h")
        assert code == 0, err
        new = printed_secret(out)
        assert "the previous secret signs too until" in out
        record = await stored(topology_bus)
        assert (record.webhook_secret, record.webhook_previous_secret) == (new, OLD)
        assert 3590 < record.webhook_previous_secret_until - time.time() <= 3600

        # The running replica follows the record: POSTs signed under both secrets.
        deadline = time.monotonic() + 20
        while not (post := await post_one(topology_bus, receiver)).signed_by(new):
            assert time.monotonic() < deadline, "the rotation never reached the replica"
        assert post.signed_by(OLD), "the receiver still holding the old secret takes it"
        # Unchanged for receivers that compare the whole field: one signature, the new secret's.
        assert verify_signature(new, post.timestamp, post.body, post.signature)
        assert "," not in post.signature

        receiver.secret = new  # the receiver switches, at a moment of its choosing
        assert (await post_one(topology_bus, receiver)).signed_by(new)

    # A replica started during the overlap reads it from KV, and signs under both too.
    receiver.secret = OLD  # as a receiver that has not switched yet
    async with replica(config, "bounce-b"):
        post = await post_one(topology_bus, receiver)
        assert post.signed_by(OLD) and post.signed_by(new)

    with receiver.lock:
        assert receiver.refused == [], "no batch failed verification during the rotation"


async def test_after_the_overlap_only_the_new_secret_signs_and_a_re_key_without_one_ends_it(
    topology_bus: Bus, receiver: Receiver, config: Config, tmp_path: Path
) -> None:
    async with replica(config, "bounce-a") as dispatcher:
        code, out, err = await account_webhook(config, tmp_path, "--new-secret", "--overlap", "2s")
        assert code == 0, err
        new = printed_secret(out)
        receiver.secret = new
        until = (await stored(topology_bus)).webhook_previous_secret_until
        # The overlap is time: over once the clock the replica reads when it signs is past its
        # end; no margin on top. And the replica must have read the rotated record: still on the
        # one before (a slow watch), it would sign under OLD alone, no test of an ended overlap.
        deadline = time.monotonic() + 20
        while True:
            seen = dispatcher.records.accounts.get(ACCOUNT)
            if seen is not None and seen.webhook_secret == new and time.time() > until:
                break
            assert time.monotonic() < deadline, "the rotation never reached the replica"
            await asyncio.sleep(0.05)

        post = await post_one(topology_bus, receiver)
        assert post.signed_by(new)
        assert not post.signed_by(OLD), "the overlap is over"
        assert post.signatures == post.signature

    # A re-key without --overlap ends the overlap in progress: a leaked secret stops at once.
    code, out, err = await account_webhook(config, tmp_path, "--new-secret", "--overlap", "1h")
    assert code == 0, err
    assert (await stored(topology_bus)).webhook_previous_secret == new
    code, out, err = await account_webhook(config, tmp_path, "--new-secret")
    assert code == 0, err
    record = await stored(topology_bus)
    assert (record.webhook_previous_secret, record.webhook_previous_secret_until) == ("", 0.0)
    receiver.secret = printed_secret(out)
    async with replica(config, "bounce-b"):
        post = await post_one(topology_bus, receiver)
        assert post.signed_by(receiver.secret) and not post.signed_by(new)

    with receiver.lock:
        assert receiver.refused == []


async def test_an_overlap_is_refused_without_a_new_secret_or_with_a_bad_duration(
    topology_bus: Bus, config: Config, tmp_path: Path
) -> None:
    for args in [("--overlap", "1h"), ("--new-secret", "--overlap", "soon"), ("--clear", "--overlap", "1h")]:
        code, out, err = await account_webhook(config, tmp_path, *args)
        assert code == 2, (args, out, err)
        assert "--overlap" in err, (args, err)
    record = await stored(topology_bus)
    assert (record.webhook_secret, record.webhook_previous_secret) == (OLD, "")
