"""Admin commands when NATS cannot serve them: nothing listens at the URL, or a nats-server that has
no Relais streams and buckets (the wrong URL, a cluster never started). Each command exits 1 with
one line that says so, instead of hanging or printing a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from services.core.embedded import EmbeddedNats, free_port
from tests.support.relais import REPO

# A guard against a hang (below pytest's own timeout), not a measure: a command that gives up
# does so in seconds.
GUARD = 90
# What "in seconds" allows: `connect` tries every server for about 5 s (10 rounds, half a second
# apart) before it gives up; a command that tries again for a minute leaves the operator waiting.
GIVES_UP_WITHIN = 30.0


def relais(*args: str, nats_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--nats-url", nats_url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=GUARD,
    )


COMMANDS = [
    ("suppression", "list", "--account", "acme", "--force"),
    ("account", "disable", "acme"),
    ("pause", "pool", "default"),
    ("requeue", "all"),
    ("topology", "apply"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_command_against_an_unreachable_nats_says_so(command: tuple[str, ...]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = relais(*command, nats_url=url)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("relais: ") and url in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert took < GIVES_UP_WITHIN, f"gave up after {took:.0f} s"


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c[0] not in ("account", "topology")], ids=lambda c: c[0]
)
def test_a_command_against_a_nats_without_relais_says_so(
    nats_server: EmbeddedNats, command: tuple[str, ...]
) -> None:
    # (`relais account` declares the topology on a fresh cluster, as a service would, and
    # `relais topology apply` is what declares it.)
    done = relais(*command, nats_url=nats_server.url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no Relais topology" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
