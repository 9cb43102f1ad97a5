"""`relais pause source <name>` against a real nats-server: sources are IP addresses (the config
refuses any other), and delivery workers look a source's pause up by its address. A name that is
no IP address (a typo, a host name) paused nothing, yet the command said "paused source ..." and
exited 0, and `relais status` listed the pause: the operator believed the source's mail held
while it went on being sent. It is refused as a usage error and nothing is stored."""

from __future__ import annotations

import asyncio

import pytest

from services.cli import main
from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.pause import PauseState


@pytest.mark.parametrize("name", ["mail.example.test", "192.0.2.300", "out-a"])
async def test_a_source_that_is_no_ip_address_is_refused(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    rc = await _cli(["pause", "source", name, "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 2, captured.out
    assert captured.err.startswith("relais: ") and "IP address" in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert await PauseState(topology_bus.js).paused() == [], "a refused pause stores nothing"


async def test_a_source_written_as_an_ip_address_is_paused(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await _cli(["pause", "source", "2001:DB8:0::1", "--nats-url", nats_server.url])
    assert rc == 0, capsys.readouterr().err
    listed = await PauseState(topology_bus.js).paused()
    assert [(p.kind, p.name) for p in listed] == [("source", "2001:db8::1")]


async def _cli(argv: list[str]) -> int:
    # The CLI runs its own event loop (asyncio.run): off this test's loop, in a thread.
    return await asyncio.to_thread(main, argv)
