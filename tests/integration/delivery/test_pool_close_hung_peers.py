"""A stopping worker closes its idle connections together: each close waits for the QUIT reply
(up to 5 s), so one after another a few silent peers would eat a Kubernetes grace period
(terminationGracePeriodSeconds) before the worker's other shutdown work ran."""

from __future__ import annotations

import asyncio

from services.delivery.connections import ConnectionPool
from services.delivery.smtp_session import SessionSettings
from services.delivery.tls_policy import TlsPolicy
from tests.integration.delivery.test_shaping_lease_renewal_hung_quit import SOURCE, UNCAPPED, Answers
from tests.support.raw_smtp import serving

HUNG = 5  # idle connections whose QUIT is never answered
QUIT_TIMEOUT = 5.0  # Connection.close's wait for the reply to QUIT


class CountsClosed(Answers):
    """`Answers` that never replies to QUIT and counts the connections that ended (the client
    gave up waiting and closed its socket)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port, hang_on_quit=True)
        self.closed = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super()._serve(reader, writer)
        finally:
            self.closed += 1


async def test_idle_connections_to_silent_peers_close_together(sink_port: int) -> None:
    async with serving(CountsClosed) as start:
        silent = await start("127.0.0.3", sink_port)
        # No connection cap and no rate: the pool needs no KV.
        pool = ConnectionPool(None, SessionSettings(port=sink_port, starttls=False))  # type: ignore[arg-type]
        conns = [
            await pool.checkout(SOURCE, "silent.test", "mx.silent.test", "127.0.0.3", UNCAPPED, TlsPolicy())
            for _ in range(HUNG)
        ]
        for conn in conns:
            await pool.checkin(conn, UNCAPPED, reusable=True)
        assert silent.accepted == HUNG

        closing = asyncio.create_task(pool.close())
        try:
            # One after another, they would need HUNG QUIT timeouts; together about one.
            await asyncio.wait({closing}, timeout=3 * QUIT_TIMEOUT)
            assert silent.closed == HUNG, f"{silent.closed} of {HUNG} closed within 3 QUIT timeouts"
        finally:
            await closing
