"""How `relais up` stops its services (`_stop_services`), with stand-ins for them: processes that
note each SIGTERM and their exit in one shared file. The ingress first, so that no new mail comes
in, then the router, delivery and bounce, each once the one before has exited; each given as long
as its bound, then killed; a second Ctrl-C kills all still running at once. It reports a service
that was killed or exited other than 0, so that `relais up` exits 1."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.core.config import Config, DeliveryConfig, NatsConfig
from services.up import SERVICE_NAMES, STOP_ORDER, _stop_services, stop_bounds

# On SIGTERM: note it, then exit after a moment of "drain" with the status asked for, or go on
# (a service whose drain outlasts its bound).
_STAND_IN = """
import signal, sys, time
name, notes, on_term = sys.argv[1:]
def note(what):
    with open(notes, "a") as f:
        f.write(f"{name} {what}\\n")
def term(*_):
    note("term")
    if on_term == "ignore":
        return
    time.sleep(0.2)
    note("exit")
    sys.exit(int(on_term))
signal.signal(signal.SIGTERM, term)
note("ready")
while True:
    time.sleep(0.05)
"""

Children = dict[str, subprocess.Popen[bytes]]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Children]]:
    started: Children = {}

    def start_all(**on_term: str) -> Children:
        for name in SERVICE_NAMES:
            with open(tmp_path / f"{name}.log", "wb") as log:
                started[name] = subprocess.Popen(
                    [sys.executable, "-c", _STAND_IN, name, str(tmp_path / "notes"), on_term.get(name, "0")],
                    stdout=log,
                    stderr=log,
                )
        deadline = time.monotonic() + 30
        while len(notes(tmp_path)) < len(SERVICE_NAMES):  # every handler in place
            assert time.monotonic() < deadline, notes(tmp_path)
            time.sleep(0.02)
        return started

    yield start_all
    for child in started.values():
        if child.poll() is None:
            child.kill()
            child.wait()


def notes(tmp_path: Path) -> list[str]:
    path = tmp_path / "notes"
    return path.read_text().splitlines() if path.exists() else []


def stops(tmp_path: Path) -> list[str]:
    return [line for line in notes(tmp_path) if not line.endswith(" ready")]


BOUNDS = dict.fromkeys(SERVICE_NAMES, 30.0)


def never() -> bool:
    return False


def test_the_ingress_stops_first_then_each_after_the_one_before(
    start: Callable[..., Children], tmp_path: Path
) -> None:
    children = start()
    assert _stop_services(children, BOUNDS, tmp_path, never) is True
    assert stops(tmp_path) == [f"{name} {what}" for name in STOP_ORDER for what in ("term", "exit")]
    assert all(child.returncode == 0 for child in children.values())


def test_a_service_past_its_bound_is_killed_and_the_others_still_stopped(
    start: Callable[..., Children], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    children = start(router="ignore")
    began = time.monotonic()
    assert _stop_services(children, dict(BOUNDS, router=1.0), tmp_path, never) is False
    assert time.monotonic() - began < 10
    assert children["router"].returncode == -9
    assert stops(tmp_path) == [
        "ingress term",
        "ingress exit",
        "router term",
        "delivery term",
        "delivery exit",
        "bounce term",
        "bounce exit",
    ]
    said = capsys.readouterr().err
    assert said.startswith("relais: the router did not stop within 1 s: killed; see "), said


def test_a_service_that_exits_non_zero_while_stopping_fails_the_stop(
    start: Callable[..., Children], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    children = start(delivery="3")
    assert _stop_services(children, BOUNDS, tmp_path, never) is False
    assert [child.returncode for child in children.values()] == [0, 3, 0, 0]
    said = capsys.readouterr().err
    assert said.startswith("relais: the delivery exited with 3 while stopping"), said
    assert str(tmp_path / "delivery.log") in said


def test_a_second_signal_kills_every_service_still_running_at_once(
    start: Callable[..., Children], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    children = start(delivery="ignore")

    def second_signal() -> bool:  # once delivery is draining, as in a long wait for a reply
        return "delivery term" in notes(tmp_path)

    began = time.monotonic()
    assert _stop_services(children, dict(BOUNDS, delivery=600.0), tmp_path, second_signal) is False
    assert time.monotonic() - began < 10, "at once, not after delivery's bound"
    assert children["delivery"].returncode == children["bounce"].returncode == -9
    assert "bounce term" not in stops(tmp_path), "killed without waiting for a drain"
    assert capsys.readouterr().err == "relais: stopped at once: killed the delivery and bounce\n"


def test_every_service_has_its_place_in_the_order_and_a_bound_that_follows_its_drain() -> None:
    assert sorted(STOP_ORDER) == sorted(SERVICE_NAMES)
    default = stop_bounds(Config())
    slower = stop_bounds(
        Config(delivery=DeliveryConfig(data_done_timeout=1200.0), nats=NatsConfig(publish_timeout=10.0))
    )
    assert slower["delivery"] - default["delivery"] == 1200.0 - DeliveryConfig().data_done_timeout
    # The ingress's hand-offs left running get their broker round trips at nats.publish_timeout.
    assert slower["ingress"] > default["ingress"]
