"""JetStream's store is full (`max_file_store` reached): the ingress answers `452 4.3.1
Insufficient system storage` at once, as Postfix does when its queue file system is short of
space (RFC 3463 X.3.1 "Mail system full"), and queues mail again once there is room.

A refusal for want of room is certain (nothing was stored) and does not lift within the
hand-off's deadline: asking again until `nats.publish_timeout` only kept each client waiting
for a `451 4.3.0` that says "the queue is unavailable" rather than what is wrong."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DiscardPolicy

from services.core.config import AccountConfig
from services.core.embedded import EmbeddedNats
from services.core.topology import SUBMIT_STREAM
from services.ingress.replies import INSUFFICIENT_STORAGE
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, asubmit, message, password_hash
from tests.support.store_full import FILLER, fill_store, small_store


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server whose JetStream store holds a few MB, as `max_file_store` limits each
    production server's."""
    with small_store(tmp_path, "8M") as server:
        yield server


# The first write the store refuses: the envelope, the large body before it, or the account's
# hourly count before either.
@pytest.mark.parametrize("refused", ["envelope", "body", "rate counter"])
async def test_a_full_store_is_answered_452_at_once(make_ingress: Callable[..., Any], refused: str) -> None:
    inline_max = 64 if refused == "body" else 128 * 1024
    limited = AccountConfig(
        password_hash=password_hash(), domains=[SENDER_DOMAIN], pool="default", max_messages_per_hour=100
    )
    ingress = await make_ingress(
        nats={"events_max_bytes": 1024 * 1024, "inline_body_max": inline_max},
        **({"accounts": {ACCOUNT: limited}} if refused == "rate counter" else {}),
    )
    data = message(body="x" * 300)
    nc = await nats.connect(ingress.config.nats.url)
    try:
        js = nc.jetstream()
        await fill_store(js)

        started = time.monotonic()
        code, text = await asubmit(ingress.smtp_address, recipients=["r@alpha.test"], data=data)
        took = time.monotonic() - started
        assert (code, text.decode()) == (
            INSUFFICIENT_STORAGE.code,
            f"{INSUFFICIENT_STORAGE.enhanced_status} {INSUFFICIENT_STORAGE.text}",
        )
        assert took < ingress.config.nats.publish_timeout / 2, f"answered after {took:.1f}s"
        assert (await js.stream_info(SUBMIT_STREAM)).state.messages == 0

        await js.delete_stream(FILLER)  # the operator made room
        code, text = await asubmit(ingress.smtp_address, recipients=["r@alpha.test"], data=data)
        assert code == 250, text
        assert (await js.stream_info(SUBMIT_STREAM)).state.messages == 1
    finally:
        await nc.close()


async def test_a_queue_an_operator_capped_is_answered_452_once_full(make_ingress: Callable[..., Any]) -> None:
    """A stream's own limits, with new messages refused rather than old ones dropped (`nats
    stream edit --max-msgs ... --discard new`), are a full store too."""
    ingress = await make_ingress(nats={"events_max_bytes": 1024 * 1024})
    nc = await nats.connect(ingress.config.nats.url)
    try:
        js = nc.jetstream()
        capped = (await js.stream_info(SUBMIT_STREAM)).config
        capped.max_msgs, capped.discard = 1, DiscardPolicy.NEW
        await js.update_stream(capped)

        first = await asubmit(ingress.smtp_address, recipients=["r@alpha.test"], data=message())
        second = await asubmit(ingress.smtp_address, recipients=["r@alpha.test"], data=message())
        assert first[0] == 250, first
        assert second[0] == INSUFFICIENT_STORAGE.code, second
        assert (await js.stream_info(SUBMIT_STREAM)).state.messages == 1
    finally:
        await nc.close()
