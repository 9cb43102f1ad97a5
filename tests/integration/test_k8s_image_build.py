"""The image build's Python steps, replayed on the build context that .dockerignore lets through.

No Docker daemon (nor Docker Hub) is reachable here, so the image is not built; this runs what
the Dockerfile's build stage runs: a wheel built in pip's isolated build environment (which
fetches setuptools from the package index, as `docker build` does), a virtualenv without pip,
and an offline install of the wheel into it; then `relais <service> --help` from that venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from services.cli import SERVICES
from tests.unit.k8s_manifests import ROOT
from tests.unit.test_k8s_image import _dockerignore_allows


def _build_context(target: Path) -> Path:
    """Copy the files .dockerignore lets into the build context (tracked files only)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    for relative in listed:
        if _dockerignore_allows(relative) and (ROOT / relative).is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, target / relative)
    return target


@pytest.mark.timeout(300)
def test_build_context_installs_and_runs(tmp_path: Path) -> None:
    """Relais' own dependencies are not fetched again: the wheel is installed with --no-deps
    and the dependencies already installed here are put on PYTHONPATH to run it."""
    context = _build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    quiet = {"capture_output": True, "text": True, "timeout": 240, "check": False}
    built = subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)], **quiet)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("relais-*.whl")
    venv = tmp_path / "opt-relais"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
        **quiet,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (venv / "bin" / "relais").exists()
    assert not list(venv.rglob("pip")), "pip must not be in the runtime venv"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_path("purelib")}
    for service in SERVICES:
        ran = subprocess.run(
            [str(venv / "bin" / "relais"), service, "--help"], cwd=tmp_path, env=env, **quiet
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import services, sys; print(services.__file__)"],
        cwd=tmp_path,
        env=env,
        **quiet,
    )
    assert located.stdout.startswith(str(venv)), "ran the installed copy, not the repository"
