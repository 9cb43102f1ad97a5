"""Run a Python script in mount and network namespaces of its own (root and `unshare` only),
with files bound over system ones (/etc/hosts, /etc/resolv.conf): real name resolution that the
test decides, without touching the machine's. The namespaces, and whatever the script started,
end with the script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-mn", "true"], capture_output=True, timeout=10).returncode == 0


def run_isolated(
    script: Path, binds: Mapping[Path, str], *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`script` run from the repository with loopback up and each file of `binds` mounted over
    the path it maps to."""
    mounts = "".join(f" && mount --bind {source} {target}" for source, target in binds.items())
    inner = f"ip link set lo up{mounts} && exec {sys.executable} {script}"
    return subprocess.run(
        ["unshare", "-mn", "sh", "-c", inner], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
