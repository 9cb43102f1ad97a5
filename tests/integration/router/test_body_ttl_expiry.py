"""A message whose large body went by the Object Store's TTL before the router signed it still
gets its one outcome: each of its recipients expires (4.4.7), with one DSN. A younger one without
its body is a redelivery of a finished message, dropped without a word as before."""

from __future__ import annotations

import time

from services.core.topology import (
    BOUNCE_STREAM,
    DELIVER_STREAM,
    ROUTE_STREAM,
    ROUTER_CONSUMER,
    body_ttl,
    route_subject,
)
from tests.integration.bounce.conftest import wait_consumed
from tests.integration.delivery.test_body_ttl_expiry import assert_expired_with_one_dsn, bodiless
from tests.integration.router.conftest import DOMAINS, SENDER_MX
from tests.integration.router.test_dkim_signing import _write_keys
from tests.support.relais import SENDER_DOMAIN, read_events


async def test_a_message_older_than_its_body_ttl_expires_with_a_dsn(
    make_stack, make_sink, zone, tmp_path
) -> None:
    # With a DKIM key for the sender's domain the router reads the body to sign it.
    sender_mx = make_sink(SENDER_MX)
    mxs = [make_sink(ip) for ip in (DOMAINS["alpha.test"], DOMAINS["beta.test"])]
    stack = await make_stack(dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)})
    url = stack.config.nats.url
    recipients = ("late@alpha.test", "late@beta.test")
    env = bodiless(recipients, time.time() - body_ttl(stack.config) - 60.0)

    await stack._buses[0].publish(route_subject(), env.to_msgpack(), msg_id=env.id)

    await assert_expired_with_one_dsn(url, sender_mx, env, recipients)
    assert [m for mx in mxs for m in mx.messages] == []


async def test_a_younger_message_without_its_body_is_still_dropped_silently(
    make_stack, zone, tmp_path
) -> None:
    stack = await make_stack(services=("router", "bounce"), dkim={SENDER_DOMAIN: _write_keys(tmp_path, zone)})
    url = stack.config.nats.url
    env = bodiless(("again@alpha.test",), time.time() - stack.config.retry.max_age)

    await stack._buses[0].publish(route_subject(), env.to_msgpack(), msg_id=env.id)
    await wait_consumed(url, ROUTE_STREAM, ROUTER_CONSUMER)

    for stream in (BOUNCE_STREAM, DELIVER_STREAM):
        info = await stack._buses[0].js.stream_info(stream)
        assert info.state.last_seq == 0, f"nothing was ever stored on {stream}"
    assert [e for e in await read_events(url) if e.message_id == env.id] == []
