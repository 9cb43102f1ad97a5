"""`relais suppression add/list/check/remove` against a real nats-server, as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.core.embedded import EmbeddedNats
from tests.support.relais import REPO, config_to_toml, make_config


def relais(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "suppression", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


async def test_operator_manages_an_accounts_suppression_list(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    from services.core.runtime import start_bus

    config = make_config(nats_url=nats_server.url)
    bus = await start_bus(config, "test-topology", attempts=5)  # the services create the bucket
    await bus.close()
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))

    assert relais(path, "check", "x@alpha.test", "--account", "acme").returncode == 1
    added = relais(
        path, "add", "X@Alpha.test", "--account", "acme", "--expires", "30d", "--source", "ticket-7"
    )
    assert added.returncode == 0, added.stderr
    checked = relais(path, "check", "x@alpha.test", "--account", "acme")
    assert checked.returncode == 0 and "manual" in checked.stdout and "ticket-7" in checked.stdout
    listed = relais(path, "list", "--account", "acme", "--json")
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["address"] == "x@alpha.test" and entry["expires_at"] > entry["at"]
    assert relais(path, "remove", "x@alpha.test", "--account", "acme").returncode == 0
    assert relais(path, "check", "x@alpha.test", "--account", "acme").returncode == 1
    assert relais(path, "list", "--account", "nobody").returncode == 2, "unknown accounts are refused"
