"""Process wiring shared by every service: logging, tracing, NATS, topology, health, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from services.core import metrics, telemetry
from services.core.bus import ACK_PATIENCE, Bus, connect
from services.core.config import Config
from services.core.health import Check, HealthServer
from services.core.telemetry import setup_tracing
from services.core.topology import (
    ConsumerBinding,
    TopologyMissing,
    bounce_binding,
    bounce_flush_binding,
    delivery_binding,
    ensure_or_check_topology,
    inbound_binding,
    router_binding,
    stream_configs,
    submit_binding,
    verdict_binding,
    webhooks_binding,
)

log = logging.getLogger(__name__)

# How long a service may take from SIGTERM to its exit is its own drain, then this: the health
# server, what is left of the background publishes and the NATS connection closed, the tracer
# shut down. Each service's stop figure adds it; deploy/k8s sizes the grace periods by those
# figures, and `relais up` waits for each service as long (services/up.py).
EXIT_SECONDS = 10.0
# A service that only consumes (router, bounce) finishes the handlers in flight when it stops
# (`bus.consume`), each within its outputs' wait for JetStream (bus.ACK_PATIENCE) and the rest
# of its work; twice ACK_PATIENCE holds that and the exit. Work a kill cuts short is redelivered
# after nats.ack_wait, so nothing is lost either way.
CONSUMER_STOP_SECONDS = 2 * ACK_PATIENCE


class Service(Protocol):
    """What `serve` runs. A service may also define `ready() -> bool` (e.g. listeners bound),
    `describe_listeners() -> str` (what it listens on, for /readyz), and
    `webhook_accounts() -> list[str]` (the accounts whose events it posts now)."""

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
        # The message and trace this task is working on, so one grep finds a message's lines.
        entry.update(telemetry.log_fields())
        for key in ("message_id", "trace_id", "service", "event"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Libraries that log every protocol step at INFO: one JSON line per SMTP command cost the ingress
# about 15% of its CPU. Their warnings still show; at DEBUG everything does.
_CHATTY_LOGGERS = ("mail.log",)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = root.getEffectiveLevel() > logging.DEBUG
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


async def start_bus(config: Config, name: str, *, attempts: int = 60) -> Bus:
    """Connect and make sure the topology exists: declared here, or with
    `nats.declare_topology = false` applied by an operator (the relais-topology workload), which
    may come up after us in Kubernetes, as NATS may."""
    for attempt in range(attempts):
        bus: Bus | None = None
        try:
            bus = await connect(config.nats, name)
            await ensure_or_check_topology(bus.js, config)
            return bus
        except Exception as exc:
            if bus is not None:
                # Connected but the topology failed: a new connection is made on the next
                # attempt, and this one would stay open (and reconnecting) for good.
                with contextlib.suppress(Exception):
                    await bus.nc.close()
            if attempt == attempts - 1:
                raise
            if isinstance(exc, TopologyMissing):
                log.warning("waiting for the topology at %s: %s", config.nats.url, exc)
            else:
                log.warning("waiting for NATS at %s: %r", config.nats.url, exc)
            await asyncio.sleep(1.0)
    raise RuntimeError("unreachable")


def owned_bindings(name: str, config: Config) -> list[ConsumerBinding]:
    """The durable consumers a service pulls from and needs to be ready (`readiness_checks`)."""
    if name == "router":
        return [submit_binding(), router_binding(), verdict_binding()]
    if name == "delivery":
        return [delivery_binding(pool) for pool in config.served_pools()]
    if name == "bounce":
        return [bounce_binding(), bounce_flush_binding(), inbound_binding()]
    return []


def lag_bindings(name: str, config: Config, service: object = None) -> list[ConsumerBinding]:
    """The consumers whose lag a service's /metrics reports: those it owns, and for the bounce
    service also each account's `webhooks-<account>`, which it posts from. Those stay out of
    its readiness: they are made per account, and one account's dead receiver (or a consumer
    not made yet) must not take every bounce pod out of service.

    The webhook accounts are the ones the service posts for at this moment (they follow the
    account records in KV), so a webhook's lag series comes and goes with its posting."""
    bindings = owned_bindings(name, config)
    accounts = getattr(service, "webhook_accounts", None)
    if callable(accounts):
        bindings += [webhooks_binding(account) for account in accounts()]
    return bindings


def readiness_checks(
    config: Config,
    bus: Bus,
    service: object,
    bindings: list[ConsumerBinding],
    stopping: asyncio.Event | None = None,
) -> dict[str, Check]:
    async def nats_connected() -> tuple[bool, str]:
        return bus.nc.is_connected, config.nats.url

    async def topology_present() -> tuple[bool, str]:
        missing = []
        for stream in stream_configs(config):
            try:
                await bus.js.stream_info(stream.name)
            except Exception:
                missing.append(stream.name)
        for binding in bindings:
            try:
                await bus.js.consumer_info(binding.stream, binding.durable)
            except Exception:
                missing.append(binding.durable)
        return not missing, f"missing {', '.join(missing)}" if missing else ""

    async def listeners_bound() -> tuple[bool, str]:
        # A service says so with `ready()`, and names what it bound with `describe_listeners()`;
        # one that listens is ready once its socket is bound (`address` set); consumers have
        # nothing to bind.
        ready = getattr(service, "ready", None)
        if callable(ready):
            describe = getattr(service, "describe_listeners", None)
            return bool(ready()), describe() if callable(describe) else ""
        if hasattr(service, "address"):
            address = getattr(service, "address", None)
            return address is not None, f"{address[0]}:{address[1]}" if address else "not bound"
        return True, ""

    async def not_stopping() -> tuple[bool, str]:
        # From SIGTERM on, a draining ingress must get no new connections from its Service, even
        # if the endpoint removal is slower than the preStop sleep.
        stopped = stopping is not None and stopping.is_set()
        return not stopped, "stopping" if stopped else ""

    return {
        "nats": nats_connected,
        "topology": topology_present,
        "listeners": listeners_bound,
        "running": not_stopping,
    }


async def start_health(
    config: Config, name: str, bus: Bus, service: object, stopping: asyncio.Event | None = None
) -> HealthServer | None:
    """/healthz, /readyz, /metrics on telemetry.http_listen; a bind failure is logged, not fatal,
    so several services sharing a host (tests, a laptop) do not take each other down."""
    if not config.telemetry.http_listen:
        return None
    measured: set[str] = set()

    async def refresh() -> None:
        bindings = lag_bindings(name, config, service)
        # A webhook removed since the last scrape: its series go rather than freeze.
        metrics.forget_consumers(measured - {binding.durable for binding in bindings})
        measured.clear()
        measured.update(binding.durable for binding in bindings)
        await metrics.refresh_queue_gauges(bus.js, bindings)

    server = HealthServer(
        config.telemetry.http_listen,
        checks=readiness_checks(config, bus, service, owned_bindings(name, config), stopping),
        refresh=refresh,
    )
    try:
        await server.start()
    except OSError as exc:
        log.error("health/metrics endpoint %s not started: %s", config.telemetry.http_listen, exc)
        return None
    return server


async def serve(config: Config, name: str, build: Callable[[Config, Bus], Service]) -> None:
    provider = setup_tracing(config.telemetry, name)
    bus = await start_bus(config, f"relais-{name}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = build(config, bus)
    health = await start_health(config, name, bus, service, stop)
    log.info("relais %s started", name)
    try:
        await service.run(stop)
    finally:
        if health is not None:
            await health.stop()
        await bus.close()
        if provider is not None:
            provider.shutdown()
        log.info("relais %s stopped", name)


def run(main: Awaitable[None]) -> None:
    asyncio.run(main)  # type: ignore[arg-type]
