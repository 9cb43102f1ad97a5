"""A draining delivery worker opens no new connection and sends no message's final dot: a job
that would need either goes back to the pool for another worker at once. Only the reply after
a dot sent before SIGTERM is still waited for, so that is all the grace period before the kill
has to cover (deploy/k8s: terminationGracePeriodSeconds)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.core.outcome import Deferred
from services.core.runtime import start_bus
from services.delivery import smtp_session
from services.delivery.connections import ConnectionPool
from services.delivery.draining import Stopping
from services.delivery.service import DeliveryService
from services.delivery.smtp_session import SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.conftest import (
    SOURCE_A,
    attempt,
    one_transaction,
    pools,
    resolver_of,
    submit_many,
)
from tests.support.dns_server import DNSServer
from tests.support.raw_smtp import ScriptedMX, serving

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
    settings = SessionSettings(port=stalling.port, starttls=False, command_timeout=1.0)  # the greeting's
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
        services=("ingress", "router", "bounce"), pools=pools(SOURCE_A), delivery={"command_timeout": 3.0}
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


class DataRecorder(ScriptedMX):
    """A sound server that notes when it has answered DATA with 354 and what follows it."""

    extensions = (b"SIZE",)

    def __init__(self) -> None:
        super().__init__()
        self.go_ahead = False
        self.after_354 = b""

    async def on_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        self.go_ahead = True
        self.after_354 = await reader.read()  # up to the client's close
        return None


async def test_no_final_dot_once_stopping() -> None:
    # SIGTERM between the 354 and the body: the body is not sent, so the server takes nothing,
    # and the job goes back to the pool rather than wait a data_done_timeout the grace period
    # was not sized for.
    async with serving(DataRecorder) as start:
        server = await start()
        settings = SessionSettings(
            port=server.port, starttls=False, command_timeout=5.0, data_done_timeout=3.0
        )
        conn = await open_connection("127.0.0.1", "mx.test", Source("", "relais.test"), settings, TlsPolicy())
        try:
            with pytest.raises(Stopping):
                await conn.transact(
                    "a@acme.test", ["r@b.test"], b"Subject: s\r\n\r\nhi\r\n", stopping=lambda: server.go_ahead
                )
        finally:
            await conn.close()
        await asyncio.sleep(0.2)
    assert server.go_ahead
    assert b"\r\n.\r\n" not in b"\r\n" + server.after_354, server.after_354


async def test_an_unforeseen_error_in_a_transaction_defers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Raised on, it sent the job back to the queue for ever (no outcome, so no expiry either).
    def broken(body: bytes) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(smtp_session, "message_data", broken)
    async with serving(DataRecorder) as start:
        server = await start()
        settings = SessionSettings(port=server.port, starttls=False, command_timeout=5.0)
        result = await one_transaction(settings, b"Subject: s\r\n\r\nhi\r\n", ["r@b.test"])
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred) and outcome.reply.enhanced_status == "4.3.0", outcome
    assert result.broken, "the connection is not reused after an error nobody understood"
