"""A DSN window holding a notice of a later release (a newer schema, during a rolling upgrade)
is left for an upgraded replica: an older one used to drop the notice, and the DSN with it."""

from __future__ import annotations

import time

import msgpack
import pytest
from nats.aio.msg import Msg

from services.bounce.hold import FlushRequest, HoldStore
from services.bounce.service import BounceService
from services.core.bus import Bus, Retry
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats
from services.core.envelope import NEXT_SCHEMA, BounceNotice, new_message_id
from services.core.outcome import Bounced, Reply
from tests.support.relais import an_envelope


def _notice_of_a_later_release(message_id: str) -> bytes:
    env = an_envelope("a@alpha.test", body=b"hi\r\n", id=message_id)
    failure = Bounced("a@alpha.test", Reply(550, "5.1.1", "no such user"), mx_host="mx.alpha.test")
    wire = msgpack.unpackb(BounceNotice(env, (failure,)).to_msgpack())
    wire["v"] = NEXT_SCHEMA + 1
    return msgpack.packb(wire)


def _flush(request: FlushRequest) -> Msg:
    return Msg(_client=None, subject="relais.bounce.flush", data=request.to_json(), headers={})  # type: ignore[arg-type]


async def test_a_window_with_a_later_releases_notice_waits(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    service = BounceService(Config(nats=NatsConfig(url=nats_server.url)), topology_bus)
    hold = HoldStore(topology_bus.js)
    mid = new_message_id()
    assert await hold.put(mid, "n1", _notice_of_a_later_release(mid))
    joined = await hold.join(mid, "n1", "failed", new_id="w1", flush_at=time.time())

    with pytest.raises(Retry):
        await service.flush(_flush(FlushRequest(mid, joined.window_id)))
    # Still held, and the window not reported: an upgraded replica's flush sends its DSN.
    assert [nid for nid, _ in await hold.notices(mid, ["n1"])] == ["n1"]
    window = await hold.close(mid, joined.window_id)
    assert window is not None and not window.sent


async def test_a_flush_request_of_a_later_release_waits(topology_bus: Bus, nats_server: EmbeddedNats) -> None:
    service = BounceService(Config(nats=NatsConfig(url=nats_server.url)), topology_bus)
    later = Msg(
        _client=None, subject="relais.bounce.flush", data=b'{"v": 2, "message_id": "m", "window": "w"}'
    )  # type: ignore[arg-type]
    with pytest.raises(Retry):
        await service.flush(later)
