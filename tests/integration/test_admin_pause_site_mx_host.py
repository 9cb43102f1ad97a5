"""`relais pause site <MX host>` against a real nats-server and real services. The router names a
site by a `[sites]` rule (no dots in its name) or by the registrable part of the primary MX host
(mx.alpha.test -> alpha.test), and delivery holds a job by that name. `relais pause site
mx.alpha.test`, the host an operator sees in logs and replies, said "paused site mx.alpha.test",
exited 0 and was listed by `relais status`, while mail to alpha.test went on being sent. Such a
name is a usage error naming the site the host's mail is in, and nothing is stored; a site a
shaping rule names (any name, dots and all) is still taken; resuming any name stays allowed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.cli import main
from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.pause import PauseState, pause_key
from services.core.topology import DELIVERY_CONTROL_BUCKET
from tests.integration.delivery.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    shaping_file,
    submit_many,
    zone,
)
from tests.support.relais import read_events, relais_cli, wait_for_events
from tests.support.smtp_sink import SMTPSink

HELD_FOR = 3.0  # three pause rechecks (delivery.pause_recheck = 1 s in these stacks)


@pytest.mark.parametrize(
    ("name", "site"),
    [
        ("mx.alpha.test", "alpha.test"),
        ("MX1.Mail.Example.co.uk.", "example.co.uk"),
        ("mx.bücher.test", "xn--bcher-kva.test"),  # spelt as the router names sites
    ],
)
async def test_an_mx_host_is_refused_naming_the_site_its_mail_is_in(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], name: str, site: str
) -> None:
    rc = await _cli(["pause", "site", name, "--reason", "incident 5", "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 2, captured.out
    assert captured.out == "", "nothing says it was paused"
    (line,) = captured.err.splitlines()
    assert line.startswith("relais: ") and "is no site name" in line, line
    assert f"is in site {site} (" in line, line
    assert await PauseState(topology_bus.js).paused() == [], "a refused pause stores nothing"


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("alpha.test", "alpha.test"),
        ("Example.co.uk.", "example.co.uk"),
        ("google", "google"),  # a [sites] rule's name
        ("192.0.2.1", "192.0.2.1"),  # an MX host given as an address names its own site
    ],
)
async def test_a_name_the_router_gives_a_site_is_paused(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], name: str, stored: str
) -> None:
    rc = await _cli(["pause", "site", name, "--nats-url", nats_server.url])
    assert rc == 0, capsys.readouterr().err
    listed = await PauseState(topology_bus.js).paused()
    assert [(p.kind, p.name) for p in listed] == [("site", stored)]


async def test_a_stored_pause_of_an_mx_host_can_be_resumed(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stored before site names were checked: it must not stay listed for ever.
    kv = await topology_bus.js.key_value(DELIVERY_CONTROL_BUCKET)
    record = {"kind": "site", "name": "mx.alpha.test", "reason": "old", "at": 1.0, "by": "ann"}
    await kv.put(pause_key("site", "mx.alpha.test"), json.dumps(record).encode())
    rc = await _cli(["resume", "site", "mx.alpha.test", "--nats-url", nats_server.url])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "resumed site mx.alpha.test" in captured.out
    assert await PauseState(topology_bus.js).paused() == []


async def test_an_unreadable_shaping_file_is_read_only_for_a_name_it_could_make_a_site(
    topology_bus: Bus, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The admin host may lack the delivery hosts' shaping file: pausing a site needs it not.
    config = tmp_path / "relais.toml"
    config.write_text(f'[delivery]\nshaping_file = "{tmp_path / "missing.toml"}"\n')
    common = ["--config", str(config), "--nats-url", nats_server.url]
    assert await _cli(["pause", "site", "alpha.test", *common]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert await _cli(["pause", "site", "mx.beta.test", *common]) == 2
    err = capsys.readouterr().err
    assert "is in site beta.test (" in err and "could not be read" in err and "missing.toml" in err, err
    listed = await PauseState(topology_bus.js).paused()
    assert [p.name for p in listed] == ["alpha.test"]


async def test_the_site_the_refusal_names_holds_the_mail(
    make_stack: Callable[..., Any],  # noqa: F811 - the fixture imported above
    make_sink: Callable[..., SMTPSink],
) -> None:
    sink = make_sink("127.0.0.2")  # mx.alpha.test
    stack = await make_stack()
    url = stack.config.nats.url
    rc, out = await relais_cli("pause", "site", "mx.alpha.test", nats_url=url)
    assert rc == 2 and "is in site alpha.test" in out, out
    site = out.split("is in site ", 1)[1].split()[0]
    rc, out = await relais_cli("pause", "site", site, "--reason", "incident 5", nats_url=url)
    assert rc == 0 and out.strip() == "paused site alpha.test", out
    await _held_then_delivered(stack, sink, site)


async def test_a_dotted_site_a_shaping_rule_names_is_paused_and_holds_the_mail(
    make_stack: Callable[..., Any],  # noqa: F811 - the fixture imported above
    make_sink: Callable[..., SMTPSink],
    shaping_file: Callable[[str], str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # Delivery shapes (and holds) alpha.test's mail as the rule's site, whatever the router named.
    rules = shaping_file('[site."MX.Alpha.Test"]\nmx_suffixes = ["mx.alpha.test"]\nconnections = 2\n')
    sink = make_sink("127.0.0.2")
    stack = await make_stack(delivery={"shaping_file": rules})
    url = stack.config.nats.url
    rc, out = await relais_cli("pause", "site", "mx.alpha.test", nats_url=url)
    assert rc == 2, "without the config naming the shaping file, the rule's site is not known"
    config = tmp_path / "relais.toml"
    config.write_text(f'[delivery]\nshaping_file = "{rules}"\n')
    rc, out = await relais_cli("pause", "site", "mx.alpha.test", "--config", str(config), nats_url=url)
    assert rc == 0 and out.strip() == "paused site mx.alpha.test", out
    await _held_then_delivered(stack, sink, "mx.alpha.test")


async def _held_then_delivered(stack: Any, sink: SMTPSink, site: str) -> None:
    """Mail to alpha.test waits while `site` is paused, and goes once it is resumed."""
    url = stack.config.nats.url
    await asyncio.sleep(0.5)  # the worker's watch sees the pause
    await submit_many(stack, 2)
    await asyncio.sleep(HELD_FOR)
    assert sink.messages == [], "a paused site's mail is held"
    outcomes = ("delivered", "deferred", "bounced", "expired")
    assert not [e for e in await read_events(url) if e.kind in outcomes], "held: no attempt, no outcome"
    rc, out = await relais_cli("resume", "site", site, nats_url=url)
    assert rc == 0 and f"resumed site {site}" in out, out
    await sink.async_wait_for(2, timeout=20)
    delivered = await wait_for_events(url, "delivered", 2)
    assert {e.attempt for e in delivered} == {1}


async def _cli(argv: list[str]) -> int:
    # The CLI runs its own event loop (asyncio.run): off this test's loop, in a thread.
    return await asyncio.to_thread(main, argv)
