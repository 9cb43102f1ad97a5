"""JetStream's store fills while an MX is taking a message: the worker keeps the job until the
outcome can be stored, and the message goes out once.

The `delivered` event is what tells a redelivered job that its attempt was settled
(`redelivery`). A worker that gave up on storing it after ACK_PATIENCE had the job handed out
again, which found no record of the attempt and made the SMTP transaction again: a copy per
redelivery for as long as the store stayed full. A full store is lifted by an operator (or by
consumers emptying the queues), not by a leader election: Postfix's queue manager, short of
space, likewise keeps what it has."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

import services.core.bus as bus_module
from services.core.embedded import EmbeddedNats
from services.core.topology import DELIVER_STREAM
from tests.support.relais import asubmit, message, wait_for_events
from tests.support.store_full import FILLER, fill_store, small_store


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server whose JetStream store holds a few MB, as `max_file_store` limits each
    production server's: the test fills it, and frees it again."""
    with small_store(tmp_path, "16M") as server:
        yield server


async def test_a_delivered_message_is_sent_once_while_the_store_is_full(
    make_stack, make_sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leader elections are waited out for 30 s; a full store outlasts any such bound.
    monkeypatch.setattr(bus_module, "ACK_PATIENCE", 1.0)
    sink = make_sink("127.0.0.2")
    sink.delay_data = 2.0  # the MX takes its time after the dot: the store fills meanwhile
    stack = await make_stack(nats={"events_max_bytes": 1024 * 1024})
    url = stack.config.nats.url
    assert (await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message()))[0] == 250

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 20
        while not sink.data_commands:
            assert time.monotonic() < deadline, "the job never reached the MX"
            await asyncio.sleep(0.05)
        assert await fill_store(js) > 0
        await sink.async_wait_for(1)
        # Long enough for a worker that gives up to have the job back (nak'ed for 5 s) and send
        # it again; the lookup of its outcome finds nothing while the store is full.
        await asyncio.sleep(12.0)
        sink.delay_data = 0.0
        await js.delete_stream(FILLER)

        await wait_for_events(url, "delivered", 1, timeout=40.0)
        deadline = time.monotonic() + 20
        while (await js.stream_info(DELIVER_STREAM)).state.messages:
            assert time.monotonic() < deadline, "the job was never acked"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    await asyncio.sleep(1.0)
    assert [m.rcpt_tos for m in sink.messages] == [["r@alpha.test"]], "sent once"
    assert len(await wait_for_events(url, "delivered", 1)) == 1
