"""An MX's reply text is kept to `outcome.TEXT_MAX` characters, as Postfix keeps `line_limit`
(2048) of a multi-line reply.

Every deferral stores its reply in the job (`Envelope.attempts`): about 120 of them over the
default `retry.max_age`. aiosmtplib reads a reply of up to 32 KiB, so a job an MX kept deferring
with replies that long outgrew NATS's default `max_payload` (1 MiB) after some thirty attempts:
its retry could no longer be stored (nor, later, its expiry), and the job came back for ever,
sent to the MX again each time, without an outcome.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.bodies import BodyStore
from services.core.bus import Bus
from services.core.config import RetryConfig
from services.core.disposition import settle
from services.core.embedded import EmbeddedNats
from services.core.envelope import Attempt, Envelope
from services.core.outcome import Deferred
from services.core.schedule import next_attempt_at
from services.core.topology import ROUTE_STREAM, route_retry_subject
from tests.integration.delivery.test_data_reply_after_partial_rcpt import connect as connect_mx
from tests.support.nats import TEST_MAX_FILE_STORE
from tests.support.raw_smtp import ScriptedMX, serving
from tests.support.relais import an_envelope

BODY = b"Subject: long replies\r\n\r\nhello\r\n"
NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
# What Postfix keeps of a multi-line reply (smtp_chat.c, var_line_limit).
POSTFIX_LINE_LIMIT = 2048
# 30 lines of about 1000 octets: within aiosmtplib's 32 KiB for one reply.
LONG_450 = b"".join(b"450-4.2.1 " + b"%02d" % i + b"x" * 978 + b"\r\n" for i in range(29)) + (
    b"450 4.2.1 mailbox busy, try again later\r\n"
)


class DefersAtLength(ScriptedMX):
    """Answers every RCPT with `LONG_450`, a multi-line reply of about 29 KiB."""

    def reply_to(self, verb: bytes) -> bytes | None:
        return LONG_450 if verb == b"RCPT" else super().reply_to(verb)

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        return None  # no recipient is ever taken: no DATA comes


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with NATS's own default max_payload (the shipped deploy/k8s/base/nats.conf
    sets none); `topology_bus` declares Relais' topology on it."""
    server = EmbeddedNats(
        tmp_path / "nats-default-payload",
        max_payload=NATS_DEFAULT_MAX_PAYLOAD,
        log_file=tmp_path / "nats-default-payload.log",
        max_file_store=TEST_MAX_FILE_STORE,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def long_deferral() -> Deferred:
    """The outcome of one transaction with `DefersAtLength`, over a real connection."""
    async with serving(DefersAtLength) as start:
        conn = await connect_mx(await start())
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], BODY)
        finally:
            await conn.close()
    (deferred,) = result.outcomes
    assert isinstance(deferred, Deferred) and deferred.reply.code == 450, deferred
    return deferred


async def test_a_long_reply_is_kept_to_its_first_two_kilobytes() -> None:
    reply = (await long_deferral()).reply
    assert len(reply.text) <= POSTFIX_LINE_LIMIT, len(reply.text)
    assert reply.enhanced_status == "4.2.1" and reply.text.startswith("00xxx"), reply.text[:20]


async def test_a_job_deferred_with_long_replies_until_its_last_retry_still_stores_it(
    topology_bus: Bus,
) -> None:
    bus = topology_bus
    deferred = await long_deferral()
    # The job as it is at its last retry under the default schedule: one attempt stored per
    # deferral before (settle adds each one as it adds this one), every one with this reply.
    retry = RetryConfig()
    received = time.time() - retry.max_age + 600
    rng = random.Random(7)
    at, attempts = received, []
    while (due := next_attempt_at(received, len(attempts) + 1, at, retry, rng)) is not None and (
        due < received + retry.max_age
    ):
        attempts.append(Attempt(at, deferred.reply, "mx.b.test", ""))
        at = due
    assert len(attempts) > 100, len(attempts)
    env = an_envelope(
        "x@b.test", job_id="long-replies-1", received_at=received, attempts=tuple(attempts[:-1])
    )

    await settle(bus, BodyStore(bus.js, 128 * 1024), retry, env, [deferred])

    stored = await bus.js.get_last_msg(ROUTE_STREAM, route_retry_subject(env.key, len(attempts)))
    again = Envelope.from_msgpack(stored.data)
    assert again.recipients == ("x@b.test",) and again.attempt_count == len(attempts)
