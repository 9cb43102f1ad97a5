"""Suppressed recipients get a final "suppressed" event and no delivery attempt; when every
recipient of a message is suppressed its stored body is released."""

from __future__ import annotations

import asyncio
import time

import nats
from nats.js.errors import KeyNotFoundError, ObjectNotFoundError

from services.core.suppression import Suppression, SuppressionList
from services.core.topology import BODY_BUCKET, BODY_REFS_BUCKET
from services.router.service import SUPPRESSED
from tests.integration.router.conftest import asubmit_many
from tests.support.relais import ACCOUNT, SENDER_DOMAIN, message, read_events, wait_for_events


async def _suppress(nats_url: str, *entries: tuple[str, str]) -> None:
    nc = await nats.connect(nats_url)
    try:
        suppression = SuppressionList(nc.jetstream())
        for address, reason in entries:
            await suppression.add(Suppression(account=ACCOUNT, address=address, reason=reason))
    finally:
        await nc.close()


async def test_suppressed_recipients_are_not_sent_to(make_stack, make_sink) -> None:
    stack = await make_stack()
    url = stack.config.nats.url
    await _suppress(url, ("A@alpha.test", "hard_bounce"), ("c@beta.test", "complaint"))
    alpha, beta = make_sink("127.0.0.2"), make_sink("127.0.0.3")
    rcpts = ["a@alpha.test", "b@alpha.test", "c@beta.test"]
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", rcpts, message())])
    (got,) = await alpha.async_wait_for(1)
    assert got.rcpt_tos == ["b@alpha.test"]
    suppressed = await wait_for_events(url, "suppressed", 2)
    assert sorted(r for e in suppressed for r in e.recipients) == ["a@alpha.test", "c@beta.test"]
    assert {e.detail["reason"] for e in suppressed} == {"hard_bounce", "complaint"}
    assert all(e.reply is not None and e.reply["code"] == SUPPRESSED.code for e in suppressed)
    await wait_for_events(url, "delivered", 1)
    await asyncio.sleep(1.0)
    assert beta.messages == [] and beta.connections == 0, "no attempt for a fully suppressed domain"
    kinds = [e.kind for e in await read_events(url)]
    assert "bounced" not in kinds and "deferred" not in kinds


async def test_a_fully_suppressed_message_releases_its_stored_body(make_stack, make_sink) -> None:
    stack = await make_stack(nats={"inline_body_max": 1024})
    url = stack.config.nats.url
    await _suppress(url, ("x@alpha.test", "manual"), ("y@beta.test", "manual"))
    big = message(body="large body line\r\n" * 500)  # > inline_body_max: goes to the Object Store
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", ["x@alpha.test", "y@beta.test"], big)])
    suppressed = await wait_for_events(url, "suppressed", 2)
    message_id = suppressed[0].message_id
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        store, refs = await js.object_store(BODY_BUCKET), await js.key_value(BODY_REFS_BUCKET)
        deadline = time.monotonic() + 15
        while True:
            try:
                await store.get(message_id)
            except ObjectNotFoundError:
                break
            assert time.monotonic() < deadline, "body still stored after every recipient was suppressed"
            await asyncio.sleep(0.2)
        try:
            await refs.get(message_id)
            raise AssertionError("body reference record left behind")
        except KeyNotFoundError:
            pass
    finally:
        await nc.close()
