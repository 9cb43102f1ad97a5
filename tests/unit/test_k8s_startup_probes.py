"""Probes against the start-up the code really does.

A Relais service binds /healthz only once it has reached NATS (services.core.runtime.serve:
start_bus first, then the health server). While NATS is away it keeps trying, and after its
last attempt it logs why and exits, so the pod restarts for a reason the logs give. A startup
probe that gives up first kills it mid-wait instead: SIGTERM arrives before the service has
installed its handler, so Python dies on the spot, earlier and without that last word.
The waits are taken from the code itself, by running it against a NATS that refuses at once.
"""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from services.core import bus as bus_module
from services.core import runtime
from services.core.bus import BrokerUnavailable
from services.core.config import Config, NatsConfig
from tests.unit.k8s_manifests import KUSTOMIZATIONS, Manifest, relais_workloads, render


async def _one_connect_waits(monkeypatch: pytest.MonkeyPatch) -> float:
    """Seconds one bus.connect spends on servers that refuse at once: the rounds of tries it
    allows nats-py before giving up, each after the reconnect wait."""
    options: dict[str, object] = {}

    async def refuse(**kwargs: object) -> None:
        options.update(kwargs)
        raise nats.errors.NoServersError()

    monkeypatch.setattr(bus_module.nats, "connect", refuse)
    with pytest.raises(BrokerUnavailable):
        await bus_module.connect(NatsConfig(), "probe-review")
    rounds, wait = options["max_reconnect_attempts"], options["reconnect_time_wait"]
    assert isinstance(rounds, int) and isinstance(wait, float)
    return rounds * wait


async def _start_bus_gives_up_after(monkeypatch: pytest.MonkeyPatch, per_connect: float) -> float:
    """Seconds start_bus waits for a NATS that is not there before it raises (a lower bound:
    every try fails at once, as when the servers' names do not resolve yet)."""
    attempts = 0
    slept = 0.0

    async def refused(config: NatsConfig, name: str) -> None:
        nonlocal attempts
        attempts += 1
        raise BrokerUnavailable("refused")

    async def sleep(delay: float) -> None:
        nonlocal slept
        slept += delay

    monkeypatch.setattr(runtime, "connect", refused)
    monkeypatch.setattr(runtime.asyncio, "sleep", sleep)
    with pytest.raises(BrokerUnavailable):
        await runtime.start_bus(Config(), "probe-review")
    return attempts * per_connect + slept


def _startup_window(container: Manifest) -> float:
    probe = container["startupProbe"]
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
async def test_startup_probe_outlasts_the_wait_for_nats(
    kustomization: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    give_up = await _start_bus_gives_up_after(monkeypatch, await _one_connect_waits(monkeypatch))
    assert give_up > 60, "start_bus no longer waits for NATS: this test measures the wrong thing"
    workloads = relais_workloads(render(kustomization))
    assert workloads
    for workload in workloads:
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        window = _startup_window(container)
        assert window > give_up, (
            f"{workload['metadata']['name']}: the startup probe kills the pod after {window:.0f} s, "
            f"while it is still waiting for NATS (it gives up by itself after {give_up:.0f} s)"
        )
