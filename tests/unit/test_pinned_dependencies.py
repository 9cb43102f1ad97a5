"""constraints.txt pins every dependency, and the suite runs on exactly those pins.

bootstrap.py and the Dockerfile install with it, so what ships is what these tests ran on; a
dependency added to pyproject.toml without a pin, or a venv upgraded past the pins, is caught
here rather than in production.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    """A distribution name as pip compares them (PEP 503), without extras or versions."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    return pins


def test_every_dependency_of_pyproject_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [
        *project["dependencies"],
        *(r for group in project["optional-dependencies"].values() for r in group),
    ]
    unpinned = {_name(requirement) for requirement in declared} - set(_pins())
    assert not unpinned, f"add to constraints.txt: {sorted(unpinned)}"


def test_the_suite_runs_on_the_pinned_versions() -> None:
    installed = {_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    differing = {
        name: (pinned, installed.get(name, "missing"))
        for name, pinned in _pins().items()
        if installed.get(name) != pinned
    }
    assert not differing, f"(pinned, installed): {differing}; run bootstrap.py or update the pins"
