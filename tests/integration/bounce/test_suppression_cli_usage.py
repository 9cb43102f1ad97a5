"""`relais suppression` used wrongly: one line on stderr, a non-zero exit status, no traceback, and
nothing written to the suppression list."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.core.embedded import EmbeddedNats
from tests.integration.bounce.test_suppression_cli import relais
from tests.support.relais import config_to_toml, make_config


@pytest.fixture
async def config_path(nats_server: EmbeddedNats, tmp_path: Path) -> Path:
    from services.core.runtime import start_bus

    config = make_config(nats_url=nats_server.url)
    bus = await start_bus(config, "test-topology", attempts=5)  # the services create the bucket
    await bus.close()
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    return path


def assert_refused(run: subprocess.CompletedProcess[str], status: int, says: str) -> None:
    assert run.returncode == status, run
    assert says in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stdout == "", "errors go to stderr"


@pytest.mark.parametrize("expires", ["bogus", "-3d", "0"])
def test_an_expiry_that_is_no_duration_is_a_usage_error(config_path: Path, expires: str) -> None:
    added = relais(config_path, "add", "x@alpha.test", "--account", "acme", f"--expires={expires}")
    assert_refused(added, 2, "--expires")
    assert relais(config_path, "check", "x@alpha.test", "--account", "acme").returncode == 1


def test_an_unknown_account_is_refused_on_stderr(config_path: Path) -> None:
    assert_refused(relais(config_path, "list", "--account", "nobody"), 2, "unknown account 'nobody'")


@pytest.mark.parametrize("action", ["add", "remove", "check"])
def test_an_action_without_an_address_is_refused_on_stderr(config_path: Path, action: str) -> None:
    assert_refused(relais(config_path, action, "--account", "acme"), 2, "needs an address")
