"""A draining delivery worker opens no new connection: the attempt it has in hand when SIGTERM
comes ends with the transaction under way, and a job that would need another address goes
back to the pool for another worker at once. The grace period before the kill then only has to
cover one transaction (deploy/k8s: terminationGracePeriodSeconds)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.runtime import start_bus
from services.delivery.connections import ConnectionPool
from services.delivery.sending import Stopping
from services.delivery.service import DeliveryService
from services.delivery.smtp_session import SessionSettings
from tests.integration.delivery.conftest import SOURCE_A, attempt, pools, resolver_of, submit_many
from tests.support.dns_server import DNSServer

STALLING_MX = "127.0.0.41"


class StallingMX:
    """Takes connections and never greets; counts them."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connections = 0
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._hold, self.host, self.port)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        self.connected.set()
        await reader.read()  # until the client gives up

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


@pytest.fixture
async def stalling(sink_port: int) -> AsyncIterator[StallingMX]:
    mx = StallingMX(STALLING_MX, sink_port)
    await mx.start()
    yield mx
    await mx.stop()


async def test_no_next_address_once_stopping(dns_server: DNSServer, stalling: StallingMX) -> None:
    dns_server.add("gamma.test", "MX", "10 mx1.gamma.test.", "20 mx2.gamma.test.")
    dns_server.add("mx1.gamma.test", "A", STALLING_MX)
    dns_server.add("mx2.gamma.test", "A", "127.0.0.42")
    settings = SessionSettings(port=stalling.port, starttls=False, connect_timeout=1.0)
    pool = ConnectionPool(None, settings)  # type: ignore[arg-type]
    try:
        with pytest.raises(Stopping):
            await attempt(
                pool,
                resolver_of(dns_server),
                ["mx1.gamma.test", "mx2.gamma.test"],
                "r@gamma.test",
                "gamma.test",
                stopping=lambda: stalling.connections > 0,  # SIGTERM while on the first MX
            )
    finally:
        await pool.close()
    assert stalling.connections == 1


async def test_a_draining_worker_hands_the_job_to_another(
    make_stack, make_sink, zone: DNSServer, stalling: StallingMX
) -> None:
    zone.add("gamma.test", "MX", "10 mx1.gamma.test.", "20 mx2.gamma.test.")
    zone.add("mx1.gamma.test", "A", STALLING_MX)
    zone.add("mx2.gamma.test", "A", "127.0.0.2")
    sink = make_sink("127.0.0.2")
    stack = await make_stack(
        services=("ingress", "router", "bounce"), pools=pools(SOURCE_A), delivery={"connect_timeout": 3.0}
    )
    buses = [await start_bus(stack.config, f"test-delivery-{i}", attempts=3) for i in range(2)]
    draining, other = (DeliveryService(stack.config, bus) for bus in buses)
    stops = [asyncio.Event(), asyncio.Event()]
    draining_task = asyncio.create_task(draining.run(stops[0]))
    other_task: asyncio.Task[None] | None = None
    try:
        await submit_many(stack, 1, recipient="r@gamma.test")
        await asyncio.wait_for(stalling.connected.wait(), 30)
        stops[0].set()  # SIGTERM while the first MX has not even greeted
        await asyncio.wait_for(draining_task, 20)
        assert draining.postponed["stopping"] == 1, draining.postponed
        assert sink.messages == [], "the draining worker opened no connection to the next MX"
        other_task = asyncio.create_task(other.run(stops[1]))
        (got,) = await sink.async_wait_for(1, timeout=30)
        assert got.rcpt_tos == ["r@gamma.test"]
        assert stalling.connections == 2, "the other worker tries the first MX again, then the next"
    finally:
        for stop in stops:
            stop.set()
        tasks = [draining_task] + ([other_task] if other_task else [])
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for bus in buses:
            await bus.nc.close()
