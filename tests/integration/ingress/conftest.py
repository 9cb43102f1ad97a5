"""Ingress scenarios: the ingress alone against a real nats-server (fast), or the whole stack.

`make_ingress(**sections)` starts only the ingress (what it queued stays in the stream for the
test to read back); `make_stack` (from the spine) runs all four services with MX sinks and DNS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from services.core.embedded import EmbeddedNats
from tests.integration.spine.conftest import (  # noqa: F401 - fixtures re-exported for this folder
    _stop_made_stacks,
    make_stack,
    sender_mx,
    zone,
)
from tests.support.relais import RelaisStack, make_config


@pytest.fixture
def make_ingress(nats_server: EmbeddedNats) -> Iterator[Callable[..., Any]]:
    """Factory: `await make_ingress(ingress={...}, accounts={...})` -> a started ingress-only stack."""
    stacks: list[RelaisStack] = []

    async def make(**sections: Any) -> RelaisStack:
        config = make_config(nats_url=nats_server.url, **sections)
        stack = RelaisStack(config)
        stacks.append(stack)
        await stack.start(services=("ingress",))
        return stack

    make.stacks = stacks  # type: ignore[attr-defined]
    yield make


@pytest.fixture(autouse=True)
async def _stop_made_ingresses(make_ingress: Callable[..., Any]) -> AsyncIterator[None]:
    yield
    for s in make_ingress.stacks:  # type: ignore[attr-defined]
        await s.stop()
