"""The router's two queues: new mail on `relais.submit` (the ingress's, bounce's DSNs) and mail
routed again on `relais.route` (retries, jobs handed back), one handler for both. During a
rolling upgrade an ingress pod of the release before still publishes accepted mail to
`relais.route`: it is routed and delivered like the new pods' mail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.core.topology import (
    ROUTE_STREAM,
    ROUTER_CONSUMER,
    SUBMIT_CONSUMER,
    SUBMIT_STREAM,
    route_subject,
    submit_subject,
)
from tests.integration.bounce.conftest import wait_consumed
from tests.support.relais import an_envelope, read_events, wait_for_events
from tests.support.smtp_sink import SMTPSink


async def test_mail_on_either_queue_is_routed_and_delivered(
    make_stack: Callable[..., Any], make_sink: Callable[..., SMTPSink]
) -> None:
    stack = await make_stack(services=("router", "delivery"))
    sink = make_sink("127.0.0.2")
    bus = stack._buses[0]
    new = an_envelope("new@alpha.test", body=b"Subject: new\r\n\r\nnew mail\r\n")
    old = an_envelope("old@alpha.test", body=b"Subject: old\r\n\r\nfrom an older ingress\r\n")
    submitted = await bus.publish(submit_subject(), new.to_msgpack(), msg_id=new.id)
    routed = await bus.publish(route_subject(), old.to_msgpack(), msg_id=old.id)
    assert (submitted.stream, routed.stream) == (SUBMIT_STREAM, ROUTE_STREAM)

    got = await sink.async_wait_for(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["new@alpha.test", "old@alpha.test"]
    url = stack.config.nats.url
    await wait_for_events(url, "delivered", 2)
    delivered = {e.message_id for e in await read_events(url) if e.kind == "delivered"}
    assert delivered == {new.id, old.id}
    # Each taken from its own queue, and acked there.
    await asyncio.gather(
        wait_consumed(url, SUBMIT_STREAM, SUBMIT_CONSUMER), wait_consumed(url, ROUTE_STREAM, ROUTER_CONSUMER)
    )
