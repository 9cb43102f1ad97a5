"""`relais topology apply`: declare the JetStream topology as an operator, for services that
do not (`nats.declare_topology = false`, as on Kubernetes, where their NATS users may not change
streams). Run it with a user that may (`admin`); it creates what is missing and brings the rest
to this release's shape, as every service does at start by default (`topology.ensure_topology`).

`--serve` keeps running afterwards with the services' /healthz and /readyz (the relais-topology
Deployment): the pod applies the topology at each start, so each configuration change (its
ConfigMap hash) applies it again. Meanwhile it purges the bodies the services marked deleted,
which their users may not purge (services.core.bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from services.core.bodies import sweep_deleted_bodies
from services.core.bus import Bus
from services.core.config import Config, replace
from services.core.runtime import serve, start_bus

COMPONENT = "topology"

log = logging.getLogger(__name__)


# How often the keeper purges the bodies marked deleted since its last sweep. Until then they
# are gone for every reader, and only take room in the store.
SWEEP_INTERVAL = 30.0


class TopologyKeeper:
    """The `--serve` process after the topology was applied: it stays up, so its readiness (the
    topology present) shows in the rollout, and sweeps the deleted bodies."""

    def __init__(self, config: Config, bus: Bus, *, sweep_interval: float = SWEEP_INTERVAL) -> None:
        self.config = config
        self._bus = bus
        self._sweep_interval = sweep_interval

    async def run(self, stop: asyncio.Event) -> None:
        log.info("topology applied at %s", self.config.nats.url)
        swept_to = 0
        while not stop.is_set():
            try:
                swept_to = await sweep_deleted_bodies(self._bus, after=swept_to)
            except Exception as exc:
                # Another sweep will come: a deleted body waits for it, taking room only.
                log.warning("sweeping deleted bodies failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._sweep_interval)


def declaring(config: Config) -> Config:
    """The config as this command runs it: declaring, whatever the file says (it is the
    services' file, which on Kubernetes says they do not)."""
    return replace(config, nats={"declare_topology": True})


async def apply(config: Config, *, attempts: int = 1) -> int:
    """Apply once; exit status 0 once applied. An operator's command: NATS unreachable, it
    gives up after `connect`'s own rounds (seconds), as every admin command does, instead of
    trying again for a minute (the relais-topology pod, `--serve`, is the one that waits)."""
    bus = await start_bus(declaring(config), "relais-topology", attempts=attempts)
    await bus.close()
    print(f"topology applied at {config.nats.url}")
    return 0


async def apply_and_serve(config: Config) -> int:
    await serve(declaring(config), COMPONENT, TopologyKeeper)
    return 0


def main(config: Config, *, keep_serving: bool) -> int:
    if keep_serving:
        return asyncio.run(apply_and_serve(config))
    # The transport logs each failed connect, which is noise on an operator's terminal: the
    # failure is said once, below (as `commands.run_against_nats` has it for the others).
    logging.basicConfig(level=logging.ERROR)
    try:
        return asyncio.run(apply(config))
    except Exception as exc:
        print(f"relais: topology not applied at {config.nats.url}: {exc!r}", file=sys.stderr)
        return 1
