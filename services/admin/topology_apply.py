"""`relais topology apply`: declare the JetStream topology as an operator, for services that
do not (`nats.declare_topology = false`, as on Kubernetes, where their NATS users may not change
streams). Run it with a user that may (`admin`); it creates what is missing and brings the rest
to this release's shape, as every service does at start by default (`topology.ensure_topology`).

`--serve` keeps running afterwards with the services' /healthz and /readyz (the relais-topology
Deployment): the pod applies the topology at each start, so each configuration change (its
ConfigMap hash) applies it again.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from services.core.bus import Bus
from services.core.config import Config, replace
from services.core.runtime import serve, start_bus

COMPONENT = "topology"

log = logging.getLogger(__name__)


class TopologyKeeper:
    """The `--serve` process after the topology was applied: nothing to do but stay up, so its
    readiness (the topology present) shows in the rollout."""

    def __init__(self, config: Config, bus: Bus) -> None:
        self.config = config

    async def run(self, stop: asyncio.Event) -> None:
        log.info("topology applied at %s", self.config.nats.url)
        await stop.wait()


def declaring(config: Config) -> Config:
    """The config as this command runs it: declaring, whatever the file says (it is the
    services' file, which on Kubernetes says they do not)."""
    return replace(config, nats={"declare_topology": True})


async def apply(config: Config, *, attempts: int = 10) -> int:
    """Apply once, waiting a little for NATS; exit status 0 once applied."""
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
    try:
        return asyncio.run(apply(config))
    except Exception as exc:
        print(f"relais: topology not applied at {config.nats.url}: {exc!r}", file=sys.stderr)
        return 1
