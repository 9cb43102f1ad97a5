"""Choosing the source (local IP + EHLO name) inside a job's pool, and knowing which IPs this host has.

A worker only sends from addresses it can bind. Each configured source is probed at start; one
that cannot be bound (the IP lives on another host, or was removed) is marked unhealthy, logged
and counted, and skipped: other workers that have it deliver that mail. A source that fails to
bind later (EADDRNOTAVAIL on connect) is marked the same way. An unhealthy source is probed
again every RECHECK_SECONDS, so an address that moves to this host (a failover) is used again.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections import Counter

from services.core.config import Config
from services.delivery.smtp_session import Source

log = logging.getLogger(__name__)


def pool_sources(config: Config, pool: str) -> list[tuple[Source, int]]:
    default_ehlo = config.delivery.helo_name or config.ingress.hostname or socket.getfqdn()
    spec = config.pools.get(pool)
    if spec is None or not spec.sources:
        return [(Source("", default_ehlo), 1)]
    return [(Source(s.address, s.ehlo or default_ehlo), s.weight) for s in spec.sources]


# One generator for the worker: seeding a new one per message (os.urandom) cost more than the pick.
_RNG = random.Random()


def pick_source(sources: list[tuple[Source, int]], rng: random.Random | None = None) -> Source:
    """Weighted random choice: over many messages each source carries its weight's share."""
    rng = rng or _RNG
    choices, weights = zip(*sources, strict=True)
    return rng.choices(choices, weights=weights, k=1)[0]


def can_bind(address: str) -> bool:
    """Whether this host can send from `address` (an empty address means "any": always)."""
    if not address:
        return True
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


RECHECK_SECONDS = 60.0


class SourceHealth:
    """Which configured source addresses this worker can use. `unhealthy_total` is metric-ready."""

    def __init__(self) -> None:
        self.unhealthy: set[str] = set()
        self.unhealthy_total: Counter[str] = Counter()
        self._checked: dict[str, float] = {}

    def probe(self, config: Config, pools: list[str]) -> None:
        for pool in pools:
            for source, _ in pool_sources(config, pool):
                if source.address not in self.unhealthy and not can_bind(source.address):
                    self.mark_unhealthy(source.address, f"cannot bind it on this host (pool {pool})")

    def mark_unhealthy(self, address: str, reason: str) -> None:
        if address not in self.unhealthy:
            log.warning("source %s marked unhealthy and skipped: %s", address, reason)
        self.unhealthy.add(address)
        self.unhealthy_total[address] += 1
        self._checked[address] = time.monotonic()

    def usable(self, sources: list[tuple[Source, int]]) -> list[tuple[Source, int]]:
        if self.unhealthy:
            self._recheck(time.monotonic())
        return [(s, w) for s, w in sources if s.address not in self.unhealthy]

    def _recheck(self, now: float) -> None:
        for address in [a for a in self.unhealthy if now - self._checked.get(a, now) >= RECHECK_SECONDS]:
            self._checked[address] = now
            if can_bind(address):
                log.info("source %s can be bound again: back in use", address)
                self.unhealthy.discard(address)


def choose_source(
    sources: list[tuple[Source, int]], pinned: str = "", rng: random.Random | None = None
) -> Source | None:
    """The pinned source (router warm-up) when it is among the usable ones, else a weighted pick."""
    if not sources:
        return None
    if pinned:
        for source, _ in sources:
            if source.address == pinned:
                return source
    return pick_source(sources, rng)
