"""Pause records in the delivery control bucket, against a real nats-server: a resume never clears
a pause set after it read the flag, and records this release cannot fully read (a newer release's
during a rolling upgrade, or a damaged one) are still listed, so `relais status` shows why mail
waits instead of crashing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.js import JetStreamContext

from services.cli import main
from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.pause import PausedAgain, PauseError, PauseState, pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET


async def test_a_pause_set_while_resuming_is_not_cleared(
    topology_bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = topology_bus.js
    state, other_operator = PauseState(js), PauseState(js)
    await state.pause("site", "alpha.test", reason="incident 41", by="ann")
    real_publish = JetStreamContext.publish
    interleaved = False

    async def pause_again_first(self: JetStreamContext, subject: str, *args: Any, **kwargs: Any) -> Any:
        # Another operator pauses the site again after resume read the flag, just before its
        # delete or purge marker goes out.
        nonlocal interleaved
        if "KV-Operation" in (kwargs.get("headers") or {}) and not interleaved:
            interleaved = True
            await other_operator.pause("site", "alpha.test", reason="incident 42", by="bob")
        return await real_publish(self, subject, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext, "publish", pause_again_first)
    with pytest.raises(PauseError, match="incident 42"):
        await state.resume("site", "alpha.test")
    monkeypatch.undo()

    assert interleaved
    assert await state.is_paused("site", "alpha.test"), "bob's pause stands"
    assert [p.reason for p in await state.paused()] == ["incident 42"]
    assert await state.resume("site", "alpha.test"), "resuming again clears it"
    assert not await state.is_paused("site", "alpha.test")
    assert not await state.resume("site", "alpha.test")


async def test_records_with_unknown_fields_or_unreadable_ones_are_listed(topology_bus: Bus) -> None:
    kv = await topology_bus.js.key_value(DELIVERY_CONTROL_BUCKET)
    newer = {"kind": "pool", "name": "bulk", "reason": "warm-up", "at": 1.0, "by": "ann", "until": 9.0}
    await kv.put(pause_key("pool", "bulk"), json.dumps(newer).encode())
    await kv.put(pause_key("site", "mx.alpha.test"), b"\x93not json")
    await kv.put(pause_key("source", "2001:db8::1"), b'["a", "list"]')

    listed = await PauseState(topology_bus.js).paused()

    assert [(p.kind, p.name) for p in listed] == [
        ("pool", "bulk"),
        ("site", "mx.alpha.test"),
        ("source", "2001:db8::1"),
    ], "delivery holds mail for each of these keys: status must show every one"
    assert listed[0].reason == "warm-up" and listed[0].by == "ann"
    assert all("unreadable" in p.reason for p in listed[1:])


def test_relais_resume_exits_1_when_paused_again_meanwhile(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not a usage error (2): the command line was right, and the state moved under it.
    async def paused_again(self: PauseState, kind: str, name: str) -> bool:
        raise PausedAgain(f"{kind} {name} was paused again while resuming")

    monkeypatch.setattr(PauseState, "resume", paused_again)
    assert main(["resume", "site", "alpha.test", "--nats-url", nats_server.url]) == 1
    assert "paused again while resuming" in capsys.readouterr().err
