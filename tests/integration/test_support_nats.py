"""The nats_server fixture gives a JetStream server that survives restarts on the same URL."""

from __future__ import annotations

import nats

from services.core.embedded import EmbeddedNats


async def test_jetstream_is_ready_and_persists_across_restart(nats_server: EmbeddedNats) -> None:
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name="SUPPORT", subjects=["support.>"])
        ack = await js.publish("support.test", b"hello")
        assert ack.seq == 1
    finally:
        await client.close()

    url = nats_server.url
    nats_server.restart()
    assert nats_server.url == url
    client = await nats.connect(nats_server.url)
    try:
        message = await client.jetstream().get_msg("SUPPORT", 1)
        assert message.data == b"hello"
    finally:
        await client.close()
