"""/readyz of an ingress with several listeners: ready only once every one accepts connections.

Kubernetes sends a pod traffic for all its ports as soon as /readyz answers 200: an ingress that
said so after its first listener had clients of the others refused. One whose listener cannot bind
never becomes ready, and the process exits non-zero (Kubernetes restarts it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from services.core.config import Config, ListenerConfig
from services.core.embedded import EmbeddedNats, free_port
from services.core.health import HealthServer, split_listen
from services.core.runtime import start_bus, start_health
from services.ingress.service import IngressService
from tests.integration.ingress.helpers import free_listen, settle, tls_sections
from tests.integration.observability.test_metrics_endpoint import aget
from tests.support.certs import TestPKI
from tests.support.relais import ServiceProcess, config_to_toml, make_config


def _three_listeners(nats_url: str, pki: TestPKI, *listens: str) -> Config:
    """Submission (587), implicit TLS (465) and inbound (25) on `listens`, in that order."""
    modes = ("submission", "implicit-tls", "inbound")
    listeners = [ListenerConfig(listen=lis, mode=mode) for lis, mode in zip(listens, modes, strict=True)]
    return make_config(
        nats_url=nats_url,
        ingress=tls_sections(pki, local_domains=["bounces.relais.test"], listeners=listeners),
        telemetry={"http_listen": f"127.0.0.1:{free_port()}"},
    )


def _connects(listen: str) -> bool:
    with socket.create_connection(split_listen(listen), timeout=5):
        return True


async def readyz(health: HealthServer) -> tuple[int, str]:
    assert health.address is not None
    return await aget(f"http://{health.address[0]}:{health.address[1]}/readyz")


@asynccontextmanager
async def ingress_with_health(config: Config) -> AsyncIterator[tuple[IngressService, HealthServer]]:
    """An ingress built (not started) with its /readyz served as `relais ingress` serves it."""
    bus = await start_bus(config, "test-ready", attempts=5)
    service = IngressService(config, bus)
    health = await start_health(config, "ingress", bus, service)
    assert health is not None
    try:
        yield service, health
    finally:
        await service.stop()
        await health.stop()
        await bus.close()


@pytest.fixture
def slow_bind(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], asyncio.Event]:
    """`slow_bind(port)`: the listener on `port` binds only once the returned event is set, as a
    listener that is slow to start; the others bind at once, on real sockets."""

    def slow(port: int) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        bind = loop.create_server
        release = asyncio.Event()

        async def create_server(*args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("port") == port:
                await release.wait()
            return await bind(*args, **kwargs)

        monkeypatch.setattr(loop, "create_server", create_server)
        return release

    return slow


async def test_not_ready_until_the_last_listener_accepts(
    nats_server: EmbeddedNats, pki: TestPKI, slow_bind: Callable[[int], asyncio.Event]
) -> None:
    listens = (free_listen(), free_listen(), free_listen())
    config = _three_listeners(nats_server.url, pki, *listens)
    release = slow_bind(split_listen(listens[2])[1])
    async with ingress_with_health(config) as (service, health):
        starting = asyncio.create_task(service.start())
        try:
            # The first two listeners take connections; the inbound one is still binding.
            assert await settle(lambda: listens[1] in service.addresses)
            assert await asyncio.to_thread(_connects, listens[0])
            status, body = await readyz(health)
            assert status == 503 and "listeners: FAIL" in body, body
        finally:
            release.set()
            await starting
        status, body = await readyz(health)
        assert status == 200 and "listeners: ok" in body, body


async def test_a_listener_that_cannot_bind_leaves_the_ingress_not_ready(
    nats_server: EmbeddedNats, pki: TestPKI
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    with taken:
        host, port = taken.getsockname()
        config = _three_listeners(nats_server.url, pki, free_listen(), free_listen(), f"{host}:{port}")
        async with ingress_with_health(config) as (service, health):
            with pytest.raises(OSError):
                await service.start()
            status, body = await readyz(health)
            assert status == 503 and "listeners: FAIL" in body, body


async def test_the_process_exits_non_zero_when_a_listener_cannot_bind(
    nats_server: EmbeddedNats, pki: TestPKI, tmp_path: Path
) -> None:
    # The contract Kubernetes relies on: a container whose port is taken fails and is restarted,
    # rather than running on with some of its listeners.
    taken = socket.create_server(("127.0.0.1", 0))
    with taken:
        host, port = taken.getsockname()
        config = _three_listeners(nats_server.url, pki, free_listen(), free_listen(), f"{host}:{port}")
        path = tmp_path / "relais.toml"
        path.write_text(config_to_toml(config))
        proc = ServiceProcess("ingress", path, tmp_path)
        proc.start()
        assert proc.process is not None
        try:
            code = await asyncio.to_thread(proc.process.wait, 60)
        finally:
            proc.stop()
        assert code != 0, proc.log()
        assert "address already in use" in proc.log().lower(), proc.log()
