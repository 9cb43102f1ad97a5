"""A replica killed while it releases a message's last body reference, after its compare-and-set
emptied the reference record and before it deleted the body: the redelivered input finishes the
release. The redelivery used to find its reference gone and stop there, and the body stayed in
the Object Store until its TTL (`retry.max_age` plus two days)."""

from __future__ import annotations

import os
import time

import pytest
from nats.aio.msg import Msg

from services.bounce.service import BounceService
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.envelope import Attempt, BodyRef, BounceNotice, new_message_id
from services.core.outcome import Bounced, Reply
from services.core.topology import bounce_subject
from tests.support.relais import an_envelope, stored_bodies

REJECTED = Reply(550, "5.1.1", "No such user", "RCPT")


class Killed(Exception):
    """The replica died here: nothing after this point ran."""


def _bounced_notice(mid: str, body: BodyRef) -> Msg:
    """The notice of a job's last outcome (it releases the job's reference). NOTIFY=NEVER: no
    DSN is due, so the bounce service releases the body at once."""
    quiet = {"a@alpha.test": "NEVER"}
    env = an_envelope("a@alpha.test", body=body, id=mid, job_id=f"{mid}-0", dsn_notify=quiet)
    notice = BounceNotice(
        env.with_attempt(Attempt(time.time(), REJECTED, "mx.alpha.test")),
        (Bounced("a@alpha.test", REJECTED, "mx.alpha.test"),),
        releases_body=True,
    )
    return Msg(_client=None, subject=bounce_subject(), data=notice.to_msgpack(), headers={})  # type: ignore[arg-type]


async def test_a_redelivered_notice_finishes_a_release_cut_short(
    topology_bus: Bus, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(nats=NatsConfig(url=nats_server.url))
    bodies = BodyStore(topology_bus.js, config.nats.inline_body_max, topology_bus)
    mid = new_message_id()
    body = await bodies.put(mid, os.urandom(200_000))
    msg = _bounced_notice(mid, body)
    job = BounceNotice.from_msgpack(msg.data).envelope.job_id
    await bodies.hold(body, [job])

    discard = BodyStore.discard
    kills: list[BodyRef] = []

    async def killed_once(self: BodyStore, ref: BodyRef) -> None:
        if not kills:
            kills.append(ref)
            raise Killed("replica killed after emptying the reference record")
        await discard(self, ref)

    monkeypatch.setattr(BodyStore, "discard", killed_once)
    service = BounceService(config, topology_bus)
    with pytest.raises(Killed):
        await service.handle(msg)
    assert kills and await stored_bodies(nats_server.url) == 1

    await service.handle(msg)  # the notice, redelivered
    with pytest.raises(BodyMissing):
        await bodies.get(body)
    assert await stored_bodies(nats_server.url) == 0
