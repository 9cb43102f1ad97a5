"""Process wiring shared by every service: logging, tracing, NATS, topology, signals."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.core.bus import Bus, connect
from services.core.config import Config
from services.core.telemetry import setup_tracing
from services.core.topology import ensure_topology

log = logging.getLogger(__name__)


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so log pipelines need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("message_id", "trace_id", "service"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def start_bus(config: Config, name: str, *, attempts: int = 60) -> Bus:
    """Connect and make sure the topology exists; NATS may come up after us in Kubernetes."""
    for attempt in range(attempts):
        try:
            bus = await connect(config.nats, name)
            await ensure_topology(bus.js, config)
            return bus
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.warning("waiting for NATS at %s: %r", config.nats.url, exc)
            await asyncio.sleep(1.0)
    raise RuntimeError("unreachable")


async def serve(config: Config, name: str, build: Callable[[Config, Bus], Service]) -> None:
    provider = setup_tracing(config.telemetry, name)
    bus = await start_bus(config, f"relais-{name}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = build(config, bus)
    log.info("relais %s started", name)
    try:
        await service.run(stop)
    finally:
        await bus.close()
        if provider is not None:
            provider.shutdown()
        log.info("relais %s stopped", name)


def run(main: Awaitable[None]) -> None:
    asyncio.run(main)  # type: ignore[arg-type]
