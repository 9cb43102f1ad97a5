"""`relais suppression` used wrongly: one line on stderr, a non-zero exit status, no traceback, and
nothing written to the suppression list; and an account that only looks unknown to it (one in
KV, not in the config file) is not refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.embedded import EmbeddedNats
from tests.integration.bounce.test_suppression_cli import relais
from tests.support.relais import REPO, config_to_toml, make_config


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


def test_an_account_added_with_relais_account_is_known(config_path: Path) -> None:
    """Accounts live in KV once the cluster runs (the file's `[accounts.*]` only seed it), and
    `relais account add` is how an operator makes one: its suppression list is managed without
    `--force`, which would also let a mistyped account through."""
    command = ["account", "add", "shop", "--password", "pw-for-shop", "--config", str(config_path)]
    added = subprocess.run(
        [sys.executable, "-m", "services.cli", *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    suppressed = relais(config_path, "add", "x@alpha.test", "--account", "shop")
    assert suppressed.returncode == 0, suppressed.stderr
    assert relais(config_path, "check", "x@alpha.test", "--account", "shop").returncode == 0
    assert_refused(relais(config_path, "list", "--account", "shops"), 2, "unknown account 'shops'")
