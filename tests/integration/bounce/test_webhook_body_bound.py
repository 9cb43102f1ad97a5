"""A batch of events is posted in bodies a receiver's web server takes. One entry per event and
recipient made a full batch of the ingress's default limits (100 events of 100 recipients) a
POST of megabytes, which nginx's default `client_max_body_size` (1 MiB) refuses with 413: the
same batch came back and was refused again for as long as the events stream kept it, and every
later event of the account waited behind it."""

from __future__ import annotations

import asyncio
import json
import time

from services.bounce.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookDispatcher, verify_signature
from services.core.bus import Bus
from services.core.config import AccountConfig, Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.events import event_for, publish_event
from services.core.topology import EVENTS_STREAM, ensure_topology, webhooks_binding
from tests.integration.bounce.test_webhook_hostile_receivers import read_request, serving
from tests.support.relais import an_envelope

SECRET = "whsec-body-bound-0123456789"
NGINX_DEFAULT_LIMIT = 1024 * 1024


async def ack_pending(bus: Bus, expected: int) -> int:
    """The account consumer's events delivered and not acked, once it is `expected` (acks are
    sent without waiting for an answer) or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        info = await bus.js.consumer_info(EVENTS_STREAM, webhooks_binding("acme").durable)
        if info.num_ack_pending == expected or time.monotonic() > deadline:
            return info.num_ack_pending
        await asyncio.sleep(0.05)


async def test_a_full_batch_of_many_recipient_events_fits_a_receiver_s_default_body_limit(
    nats_server: EmbeddedNats, topology_bus: Bus
) -> None:
    sizes: list[int] = []
    received: list[dict] = []

    async def like_nginx(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers, body = await read_request(reader)
        sizes.append(len(body))
        if len(body) > NGINX_DEFAULT_LIMIT:
            writer.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n\r\n")
        else:
            assert verify_signature(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
            received.extend(json.loads(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(like_nginx) as port:
        hooked = AccountConfig(
            password_hash="-", webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET
        )
        config = Config(nats=NatsConfig(url=nats_server.url), accounts={"acme": hooked})
        await ensure_topology(topology_bus.js, config)
        sub = await topology_bus.js.pull_subscribe_bind(webhooks_binding("acme").durable, EVENTS_STREAM)
        batch, per_message = config.bounce.webhook_batch, config.ingress.max_recipients
        for m in range(batch):
            recipients = [f"reader{m:03d}.{r:03d}@alpha.test" for r in range(per_message)]
            await publish_event(topology_bus, event_for("accepted", an_envelope(*recipients), recipients))
        msgs = await sub.fetch(batch, timeout=5)
        assert len(msgs) == batch

        pause = await WebhookDispatcher(config, topology_bus).deliver("acme", msgs)

    assert pause == 0.0, f"POST sizes {sizes}"
    assert max(sizes) <= NGINX_DEFAULT_LIMIT
    assert len(received) == batch * per_message
    assert len({entry["event_id"] for entry in received}) == batch * per_message
    assert await ack_pending(topology_bus, 0) == 0  # every event acked


async def test_after_a_failed_post_only_the_events_its_bodies_carried_in_full_are_acked(
    nats_server: EmbeddedNats, topology_bus: Bus
) -> None:
    answers = [b"200 OK", b"503 Service Unavailable"]
    received: list[dict] = []

    async def first_ok_then_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        answer = answers.pop(0) if answers else b"503 Service Unavailable"
        if answer.startswith(b"200"):
            received.extend(json.loads(body))
        writer.write(b"HTTP/1.1 " + answer + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serving(first_ok_then_down) as port:
        hooked = AccountConfig(
            password_hash="-", webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET
        )
        config = Config(nats=NatsConfig(url=nats_server.url), accounts={"acme": hooked})
        await ensure_topology(topology_bus.js, config)
        durable = webhooks_binding("acme").durable
        sub = await topology_bus.js.pull_subscribe_bind(durable, EVENTS_STREAM)
        batch, per_message = 100, 100
        for m in range(batch):
            recipients = [f"reader{m:03d}.{r:03d}@alpha.test" for r in range(per_message)]
            await publish_event(topology_bus, event_for("accepted", an_envelope(*recipients), recipients))
        msgs = await sub.fetch(batch, timeout=5)

        pause = await WebhookDispatcher(config, topology_bus).deliver("acme", msgs)

    assert pause == config.bounce.webhook_retry_base
    complete = {entry["message_id"] for entry in received}
    complete = {m for m in complete if sum(e["message_id"] == m for e in received) == per_message}
    assert 0 < len(complete) < batch  # the first body carried some events in full, not all
    # Those were acked; the rest (one of them perhaps in part posted) wait for the retry.
    assert await ack_pending(topology_bus, batch - len(complete)) == batch - len(complete)
