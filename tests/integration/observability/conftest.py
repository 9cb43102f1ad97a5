"""The spine's cluster fixtures (zone, sinks, in-process stack) plus an in-memory span exporter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.bounce.conftest import receiver  # noqa: F401 - fixture
from tests.integration.spine.conftest import (  # noqa: F401 - fixtures
    _stop_made_stacks,
    make_stack,
    sender_mx,
    stack,
    zone,
)
from tests.support.spans import collecting


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with collecting() as exporter:
        yield exporter


async def wait_for_spans(
    exporter: InMemorySpanExporter, done: Callable[[list[ReadableSpan]], bool], within: float = 20.0
) -> list[ReadableSpan]:
    """Spans end just after the outputs they wrap are acked; poll until the picture is complete."""
    deadline = time.monotonic() + within
    while True:
        got = list(exporter.get_finished_spans())
        if done(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)
