"""The ingress raises its soft open-files limit to the hard one at start, and warns when even
that is below what its listeners may hold: a full listener would otherwise fail accepts and NATS
reconnects with EMFILE. Each case runs in a child process, whose limits can be lowered freely."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import logging, resource, sys
from services.ingress import service
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
service._check_open_files(int(sys.argv[1]))
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _child(soft: int, hard: int, connections: int) -> str:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(connections)],
        cwd=ROOT,
        preexec_fn=lower,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    out = _child(256, 2048, 1000)
    assert out.splitlines() == ["soft 2048"]


def test_a_hard_limit_below_the_listeners_connections_is_reported() -> None:
    out = _child(256, 512, 1000)
    assert "open-files limit 512 is below the listeners' 1000 connections" in out
    assert out.splitlines()[-1] == "soft 512"
