"""Services that do not declare the topology (`nats.declare_topology = false`, as on Kubernetes,
where their NATS users may not change streams): they wait, creating nothing, until an operator
applied it (`relais topology apply`), and then start."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from services.admin import topology_apply
from services.core.bodies import BodyStore
from services.core.bus import Bus, connect
from services.core.config import Config, NatsConfig
from services.core.embedded import EmbeddedNats, free_port
from services.core.envelope import new_message_id
from services.core.runtime import start_bus
from services.core.topology import (
    BODY_BUCKET,
    DELIVER_STREAM,
    ROUTE_STREAM,
    WARMUP_BUCKET,
    TopologyMissing,
    ensure_or_check_topology,
    ensure_topology,
    kv_stream,
    missing_topology,
    object_stream,
    stream_configs,
    verdict_subject,
)
from tests.support.relais import REPO, run_cli


def _not_declaring(url: str) -> Config:
    return Config(nats=NatsConfig(url=url, declare_topology=False))


class _Heard(logging.Handler):
    """Set once a log line says `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_service_waits_for_the_topology_then_starts_once_an_operator_applied_it(
    nats_server: EmbeddedNats,
) -> None:
    config = _not_declaring(nats_server.url)
    waiting = _Heard("waiting for the topology")
    logging.getLogger("services.core.runtime").addHandler(waiting)
    starting = asyncio.create_task(start_bus(config, "test-router", attempts=120))
    try:
        await asyncio.wait_for(waiting.event.wait(), 30)
        assert not starting.done()
        admin = await connect(config.nats, "test-admin")
        try:
            with pytest.raises(NotFoundError):  # the waiting service created nothing
                await admin.js.stream_info(ROUTE_STREAM)
        finally:
            await admin.close()

        assert await topology_apply.apply(config) == 0

        bus = await asyncio.wait_for(starting, 30)
        try:
            assert bus.nc.is_connected
            assert await missing_topology(bus.js, config) == []
        finally:
            await bus.close()
    finally:
        starting.cancel()
        logging.getLogger("services.core.runtime").removeHandler(waiting)


async def test_the_check_names_what_is_missing_and_changes_nothing(nats_server: EmbeddedNats) -> None:
    config = _not_declaring(nats_server.url)
    bus = await connect(config.nats, "test-check")
    try:
        with pytest.raises(TopologyMissing, match=ROUTE_STREAM):
            await ensure_or_check_topology(bus.js, config)
        assert await bus.js.streams_info() == []

        await ensure_topology(bus.js, config)
        await ensure_or_check_topology(bus.js, config)  # applied: nothing to say
    finally:
        await bus.close()


async def test_a_subject_this_release_added_to_a_stream_is_waited_for(nats_server: EmbeddedNats) -> None:
    """A release that adds a subject to a stream: its services wait until the topology workload
    applied it, rather than publish to a subject no stream holds."""
    config = _not_declaring(nats_server.url)
    bus = await connect(config.nats, "test-check")
    try:
        await ensure_topology(bus.js, config)
        (declared,) = [s for s in stream_configs(config) if s.name == DELIVER_STREAM]
        # As the release before the verdicts had it.
        earlier = dataclasses.replace(
            declared, subjects=[s for s in declared.subjects or [] if s != verdict_subject()]
        )
        await bus.js.update_stream(earlier)

        assert await missing_topology(bus.js, config) == [f"{DELIVER_STREAM} subjects {verdict_subject()}"]
        with pytest.raises(TopologyMissing):
            await ensure_or_check_topology(bus.js, config)
        await ensure_topology(bus.js, config)
        assert await missing_topology(bus.js, config) == []
    finally:
        await bus.close()


def test_the_apply_command_declares_with_the_services_config_file_that_says_not_to(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    config = _not_declaring(nats_server.url)
    ran = run_cli(config, tmp_path, "topology", "apply")
    assert ran.returncode == 0, ran.stderr
    assert "topology applied" in ran.stdout

    async def check() -> list[str]:
        bus = await connect(config.nats, "test-check")
        try:
            return await missing_topology(bus.js, config)
        finally:
            await bus.close()

    assert asyncio.run(check()) == []


def test_an_account_command_on_a_cluster_without_the_topology_declares_nothing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Run where the services do not declare (a pod's config), the first `relais account`
    asks for `relais topology apply` rather than try what its user may not do."""
    config = _not_declaring(nats_server.url)
    ran = run_cli(config, tmp_path, "account", "list")
    assert ran.returncode == 1
    assert "relais topology apply" in ran.stderr

    async def streams() -> list[object]:
        bus = await connect(config.nats, "test-check")
        try:
            return await bus.js.streams_info()
        finally:
            await bus.close()

    assert asyncio.run(streams()) == []


def test_the_topology_pod_applies_then_stays_ready_until_stopped(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """`relais topology apply --serve`, the relais-topology Deployment's command: ready (its
    /readyz, which the rollout waits for) once applied, and a clean exit on SIGTERM."""
    port = free_port()
    path = tmp_path / "relais.toml"
    path.write_text(
        f'[nats]\nurl = "{nats_server.url}"\ndeclare_topology = false\n'
        f'[telemetry]\nhttp_listen = "127.0.0.1:{port}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
    command = [sys.executable, "-m", "services.cli", "topology", "apply", "--serve", "--config", str(path)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ready = _wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        assert "topology: ok" in ready
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    async def check() -> list[str]:
        bus = await connect(NatsConfig(url=nats_server.url), "test-check")
        try:
            return await missing_topology(bus.js, Config())
        finally:
            await bus.close()

    assert asyncio.run(check()) == []


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return answer.read().decode()
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"not ready (exit status {process.poll()})")


async def test_a_warm_up_bucket_without_atomic_batches_is_waited_for(nats_server: EmbeddedNats) -> None:
    """The router writes a job's warm-up counts and its verdict in one atomic batch (ADR-50): on
    a warm-up bucket that does not allow them (as nats-py makes one, or a release before them
    left it), every batch would be refused and every job of a warming pool would wait. Its
    services wait for the topology instead, which turns them on."""
    config = _not_declaring(nats_server.url)
    bus = await connect(config.nats, "test-check")
    try:
        await ensure_topology(bus.js, config)
        warmup = (await bus.js.stream_info(kv_stream(WARMUP_BUCKET))).config
        assert warmup.allow_atomic
        warmup.allow_atomic = False
        await bus.js.update_stream(warmup)

        assert await missing_topology(bus.js, config) == [f"{kv_stream(WARMUP_BUCKET)} atomic batches"]
        with pytest.raises(TopologyMissing, match="atomic batches"):
            await ensure_or_check_topology(bus.js, config)
        await ensure_topology(bus.js, config)
        assert await missing_topology(bus.js, config) == []
    finally:
        await bus.close()


async def _bodies_stream_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(object_stream(BODY_BUCKET))).state.messages


async def _until_no_body_stored(bus: Bus) -> None:
    deadline = time.monotonic() + 10
    while await _bodies_stream_messages(bus):
        assert time.monotonic() < deadline, "the deleted body's chunks are still stored"
        await asyncio.sleep(0.05)


async def test_the_topology_pod_purges_the_bodies_the_services_deleted(topology_bus: Bus) -> None:
    """The services' users may not purge the bodies' stream (deploy/k8s/base/nats.conf): a body
    they delete is only marked deleted. The topology pod (`admin`) purges it, at its start and
    at every sweep after, and leaves the bodies still queued alone."""
    bus = topology_bus
    service = BodyStore(bus.js, 0, bus, purges=False)
    deleted_before_start = await service.put(new_message_id(), os.urandom(300_000))
    await service.discard(deleted_before_start)
    assert await _bodies_stream_messages(bus), "marked deleted, still stored"

    keeper = topology_apply.TopologyKeeper(Config(), bus, sweep_interval=0.1)
    stop = asyncio.Event()
    running = asyncio.create_task(keeper.run(stop))
    try:
        await _until_no_body_stored(bus)
        queued = await service.put(new_message_id(), os.urandom(300_000))
        queued_messages = await _bodies_stream_messages(bus)
        deleted_later = await service.put(new_message_id(), os.urandom(300_000))
        await service.discard(deleted_later)
        deadline = time.monotonic() + 10
        while await _bodies_stream_messages(bus) > queued_messages:
            assert time.monotonic() < deadline, "a body deleted after the start was never purged"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more sweeps
        assert len(await service.get(queued)) == 300_000
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=5)
