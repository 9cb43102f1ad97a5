#!/usr/bin/env python3
"""Set-up in one step, on a machine that has only python3.

    python3 bootstrap.py up     # create .venv, install Relais, run `relais up`
    python3 bootstrap.py test   # create .venv, install Relais + test tools, run the whole test suite

Anything after the command is passed on (to `relais up` or to pytest; `-n 0` runs the tests
in one process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
CONSTRAINTS = ROOT / "constraints.txt"


def ensure_venv(extras: str) -> None:
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    inputs = [ROOT / "pyproject.toml", CONSTRAINTS]
    if stamp.exists() and all(stamp.stat().st_mtime >= path.stat().st_mtime for path in inputs):
        return
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    target = f".[{extras}]" if extras else "."
    # The versions the tests ran with, not the newest each range allows today.
    subprocess.run([*pip, "-c", str(CONSTRAINTS), "-e", target], check=True, cwd=ROOT)
    stamp.touch()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        ensure_venv("")
        os.execv(str(BIN / "relais"), [str(BIN / "relais"), "up", *rest])
    ensure_venv("test")
    result = subprocess.run([str(BIN / "python"), "-m", "pytest", "tests", *_workers(rest), *rest], cwd=ROOT)
    return result.returncode


def _workers(args: list[str]) -> list[str]:
    """One pytest worker per usable core (at most 4), unless the caller chose: most tests wait
    on real servers and timeouts, so a single worker leaves the machine idle for half an hour.
    Tests of one file stay on one worker (the groups are set in tests/conftest.py)."""
    if any(arg.startswith(("-n", "--numprocesses")) or arg == "no:xdist" for arg in args):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ["-n", str(min(cores, 4)), "--dist", "loadfile"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
