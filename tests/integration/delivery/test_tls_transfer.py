"""The message's transfer over TLS (STARTTLS, the usual case) is timed by progress and given up
for good, as over plaintext: a TLS transport encrypts whatever it is handed into the socket's
buffer at once, out of reach of flow control, so the body goes a piece at a time
(services/delivery/message_data.py). A transfer that stalls is given up after command_timeout
without progress, not after data_done_timeout; one that keeps moving is never cut off; and what
was given up is dropped, never flushed to the server afterwards (final dot included, which
could deliver it, and the retry then a second time)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.core.outcome import Deferred
from services.delivery.smtp_session import SessionSettings, Source, open_connection
from services.delivery.tls_policy import TlsPolicy
from tests.support.certs import TestPKI
from tests.support.raw_smtp import ReadsSlowly, StopsReadingAfter354, serving

SOURCE = Source("", "relais.test")
BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 32_000  # 32 MB


async def test_a_stalled_tls_transfer_times_out_at_command_timeout(pki: TestPKI) -> None:
    # Paused past data_done_timeout: only a timeout on progress gives the transfer up in time.
    async with serving(StopsReadingAfter354) as start:
        server = await start(pki.server_context(), pause=8.0)
        settings = SessionSettings(port=server.port, command_timeout=1.0, data_done_timeout=5.0)
        conn = await open_connection("127.0.0.1", "mx.test", SOURCE, settings, TlsPolicy())
        assert conn.tls_version, "STARTTLS was used"
        started = time.monotonic()
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], BIG)
        finally:
            await conn.close()
        elapsed = time.monotonic() - started
    (outcome,) = result.outcomes
    assert isinstance(outcome, Deferred)
    # README: "the message's transfer, given up only when it makes no progress for [command_timeout]"
    assert elapsed < 3.0, f"gave up after {elapsed:.1f}s: the data_done_timeout (5 s), not command_timeout"


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "starttls"])
async def test_a_slow_transfer_longer_than_data_done_timeout_still_goes(pki: TestPKI, tls: bool) -> None:
    # 32 MB at ~2.5 MB/s: ~13 s, more than data_done_timeout (6 s). What sits in kernel socket
    # buffers when the user-space buffer drains (a few MB on loopback) is timed as the wait
    # after the dot in both cases; the rest is timed by progress only in plaintext.
    async with serving(ReadsSlowly) as start:
        server = await start(pki.server_context())
        settings = SessionSettings(port=server.port, starttls=tls, command_timeout=1.0, data_done_timeout=6.0)
        conn = await open_connection("127.0.0.1", "mx.test", SOURCE, settings, TlsPolicy())
        assert bool(conn.tls_version) == tls
        started = time.monotonic()
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], BIG)
        finally:
            await conn.close()
    assert [o.kind for o in result.outcomes] == ["delivered"], (time.monotonic() - started, result.outcomes)


async def test_a_given_up_tls_transfer_is_dropped_not_flushed(pki: TestPKI) -> None:
    async with serving(StopsReadingAfter354) as start:
        server = await start(pki.server_context())
        settings = SessionSettings(port=server.port, command_timeout=1.0, data_done_timeout=1.0)
        conn = await open_connection("127.0.0.1", "mx.test", SOURCE, settings, TlsPolicy())
        assert conn.tls_version
        try:
            result = await conn.transact("a@acme.test", ["x@b.test"], BIG)
        finally:
            await conn.close()
        assert isinstance(result.outcomes[0], Deferred)
        await asyncio.sleep(server.pause + 3.0)
    # Given up after about 1 s of no progress: what the server reads afterwards is what was
    # already in flight, never the rest of the message.
    assert server.received < len(BIG) // 2, server.received
