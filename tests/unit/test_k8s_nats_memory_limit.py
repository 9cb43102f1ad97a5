"""nats-server's GOMEMLIMIT follows the container's memory limit.

A fixed value drifted from the limit the moment an overlay changed it: too high and the Go
runtime collects only once the kernel kills the pod, too low and it collects all the time. The
StatefulSet reads the limit through the downward API and sets GOMEMLIMIT to 90% of it in the
container's command, which this test runs in a real shell with a stand-in `nats-server`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.unit.k8s_manifests import KUSTOMIZATIONS, one, render

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> int:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def _kubelet_expand(arg: str) -> str:
    # The kubelet's only rewrite of a command without $(VAR) references: "$$" is a literal "$".
    assert "$(" not in arg.replace("$$", ""), "a $(VAR) reference the kubelet would expand"
    return arg.replace("$$", "$")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_gomemlimit_is_ninety_percent_of_the_memory_limit(kustomization: Path, tmp_path: Path) -> None:
    sts = one(render(kustomization), "StatefulSet", "nats")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert "GOMEMLIMIT" not in env, "a fixed GOMEMLIMIT does not follow the limit"
    assert env["MEMORY_LIMIT"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"],
        "resource": "limits.memory",
    }
    limit = _bytes(container["resources"]["limits"]["memory"])

    stand_in = tmp_path / "nats-server"
    stand_in.write_text('#!/bin/sh\necho "GOMEMLIMIT=$GOMEMLIMIT args=$*"\n')
    stand_in.chmod(0o755)
    command = [_kubelet_expand(arg) for arg in container["command"]]
    ran = subprocess.run(
        command + container.get("args", []),
        env={"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin", "MEMORY_LIMIT": str(limit)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert ran.stdout.strip() == f"GOMEMLIMIT={limit // 10 * 9} args=--config /etc/nats/nats.conf"
