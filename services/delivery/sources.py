"""Choosing the source (local IP + EHLO name) inside a job's pool."""

from __future__ import annotations

import random
import socket

from services.core.config import Config
from services.delivery.smtp_session import Source


def pool_sources(config: Config, pool: str) -> list[tuple[Source, int]]:
    default_ehlo = config.delivery.helo_name or config.ingress.hostname or socket.getfqdn()
    spec = config.pools.get(pool)
    if spec is None or not spec.sources:
        return [(Source("", default_ehlo), 1)]
    return [(Source(s.address, s.ehlo or default_ehlo), s.weight) for s in spec.sources]


def pick_source(sources: list[tuple[Source, int]], rng: random.Random | None = None) -> Source:
    """Weighted random choice: over many messages each source carries its weight's share."""
    rng = rng or random.Random()
    choices, weights = zip(*sources, strict=True)
    return rng.choices(choices, weights=weights, k=1)[0]
