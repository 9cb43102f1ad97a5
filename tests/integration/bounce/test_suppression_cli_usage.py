"""`relais suppression` used wrongly: one line on stderr, a non-zero exit status, no traceback, and
nothing written to the suppression list; and an account that only looks unknown to it (one in
KV, not in the config file) is not refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.core.embedded import EmbeddedNats
from services.core.runtime import start_bus
from services.core.suppression import Suppression, SuppressionList
from tests.integration.bounce.test_suppression_cli import relais
from tests.support.relais import REPO, config_to_toml, make_config


@pytest.fixture
async def config_path(nats_server: EmbeddedNats, tmp_path: Path) -> Path:
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


def nothing_listed(config_path: Path) -> bool:
    listed = relais(config_path, "list", "--account", "acme", "--json")
    return listed.returncode == 0 and listed.stdout == ""


# Not one of these is a mailbox a message went to: stored, each was an entry that suppressed no
# one (" " one with an empty address), listed as if it stood for someone.
NO_ADDRESSES = [
    " ",
    "nobody",
    "@alpha.test",
    "x@",
    "a b@alpha.test",
    "x@alpha .test",
    "x\t@alpha.test",
    "x@alpha.test\ny",
]


@pytest.mark.parametrize("action", ["add", "remove"])
@pytest.mark.parametrize("address", NO_ADDRESSES)
def test_what_is_no_address_is_refused_before_anything_is_written(
    config_path: Path, action: str, address: str
) -> None:
    refused = relais(config_path, action, address, "--account", "acme")
    assert_refused(refused, 2, "relais: ")
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert nothing_listed(config_path)


@pytest.mark.parametrize(
    ("address", "also"),
    [
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp"),
        ("x@Alpha.test.", "x@alpha.test"),
        ('"john doe"@alpha.test', '"john doe"@alpha.test'),
    ],
)
def test_real_addresses_are_still_managed(config_path: Path, address: str, also: str) -> None:
    """A UTF-8 address (SMTPUTF8), a domain with the root's trailing dot and a quoted local part
    with a space are addresses the ingress takes: they are suppressed, found in another spelling
    of the same mailbox, and removed."""
    added = relais(config_path, "add", address, "--account", "acme")
    assert added.returncode == 0, added.stderr
    assert relais(config_path, "check", also, "--account", "acme").returncode == 0
    removed = relais(config_path, "remove", address, "--account", "acme")
    assert removed.returncode == 0, removed.stderr
    assert nothing_listed(config_path)


@pytest.mark.parametrize("address", NO_ADDRESSES)
async def test_an_entry_stored_for_no_address_is_still_removed(
    nats_server: EmbeddedNats, config_path: Path, address: str
) -> None:
    """Before `add` refused them, such entries were stored (the text stripped and lower-cased,
    under the key that text derives): `remove` given the same text takes them away, as it would
    any entry, though it is no address; with no entry there it is refused as above."""
    config = make_config(nats_url=nats_server.url)
    bus = await start_bus(config, "test-old-entry", attempts=5)
    try:
        old = Suppression(account="acme", address=address.strip().lower(), reason="manual", source="operator")
        await SuppressionList(bus.js).add(old)
    finally:
        await bus.close()
    assert not nothing_listed(config_path)

    removed = relais(config_path, "remove", address, "--account", "acme")
    assert removed.returncode == 0, removed
    assert removed.stdout.startswith("removed ") and len(removed.stdout.splitlines()) == 1, removed.stdout
    assert nothing_listed(config_path)
    assert_refused(relais(config_path, "remove", address, "--account", "acme"), 2, "relais: ")
