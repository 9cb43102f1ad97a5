"""The spine's stack and zone, plus what the bounce scenarios share: VERP settings, inbound
publishing (the ingress's real contract), suppression look-ups and waiting for consumers."""

from __future__ import annotations

import asyncio
import time

import nats

from services.core.bus import Bus
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

RETURN_DOMAIN = "bounces.relais.test"
SECRET = "verp-secret-0123456789"
VERP = {"verp": True, "return_path_domain": RETURN_DOMAIN, "verp_secrets": [SECRET]}
FBL_ADDRESS = f"fbl@{RETURN_DOMAIN}"


async def publish_inbound(nats_url: str, raw: bytes, recipients: list[str], sender: str = "") -> str:
    """What the ingress's inbound listener publishes for mail to our own domains."""
    nc = await nats.connect(nats_url)
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


async def publish_route(nats_url: str, env: Envelope) -> None:
    """What the ingress publishes for an accepted submission (router input)."""
    from services.core.topology import route_subject

    nc = await nats.connect(nats_url)
    try:
        await Bus(nc=nc, js=nc.jetstream(), publish_timeout=5.0).publish(
            route_subject(), env.to_msgpack(), msg_id=env.id
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
