"""What the ingress does more cheaply per connection gives exactly what it did before.

The idle timer is checked against aiosmtpd's own (`SMTP._reset_timeout`) on the same sequences of
commands; the per-connection tables against aiosmtpd's own set-up; the cached client address
against a fresh parse; the skipped no-op span against what OpenTelemetry's no-op tracer gives.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.core import telemetry
from services.core.config import Config, IngressConfig
from services.ingress.door import Door
from services.ingress.handler import IngressHandler
from services.ingress.handoff import Submission
from services.ingress.limits import ConnectionGate
from services.ingress.policy import in_networks
from services.ingress.protocol import RelaisSMTP
from services.ingress.prototype import Prototype

TIMEOUT = 300.0
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Clock:
    """An event loop's clock and timers, moved on by hand (nothing here waits for real time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 0.0
        self._timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self._loop)
        self._timers.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        return self.call_at(self.now + delay, callback, *args)

    def advance(self, to: float) -> None:
        """Run every timer due by `to`, in time order, as the loop would."""
        while True:
            due = [h for h in self._timers if not h.cancelled() and h.when() <= to]
            if not due:
                break
            handle = min(due, key=lambda h: h.when())
            self._timers.remove(handle)
            self.now = max(self.now, handle.when())
            handle._run()
        self.now = to


def _timed(base: type[SMTP]) -> type[SMTP]:
    class Timed(base):  # type: ignore[valid-type, misc]
        fired: list[float]

        def _timeout_cb(self) -> None:
            self.fired.append(self.loop.time())

    return Timed


class _Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        return responses

    async def auth_PLAIN(self, server, args):  # type: ignore[no-untyped-def]
        return None

    async def auth_LOGIN(self, server, args):  # type: ignore[no-untyped-def]
        return None


def _door() -> Door:
    return Door(ConnectionGate(IngressConfig()), "127.0.0.1:2525")


async def _timeouts(conn: SMTP, steps: list[tuple[float, float | None]], end: float) -> list[float]:
    """When `conn`'s idle timer fires for resets at the given times (with the given durations)."""
    clock = _Clock(asyncio.get_running_loop())
    conn.loop = clock  # type: ignore[assignment]
    conn.fired = []  # type: ignore[attr-defined]
    for at, duration in steps:
        clock.advance(at)
        conn._reset_timeout(duration)
    clock.advance(end)
    return conn.fired  # type: ignore[attr-defined,no-any-return]


async def test_the_idle_timer_fires_when_aiosmtpd_own_would() -> None:
    rng = random.Random(9)
    handler = _Handler()
    for _ in range(300):
        # Commands (the default timeout), DATA progress (shorter ones) and quiet spells.
        at, steps = 0.0, []
        for _ in range(rng.randint(1, 12)):
            at += rng.choice([0.0, 0.5, 10.0, 150.0, 299.0, 300.0, 301.0, 900.0])
            steps.append((at, rng.choice([None, None, 5.0, 0.001, 400.0])))
        end = at + rng.choice([0.0, 100.0, 1000.0])
        ours = _timed(RelaisSMTP)(handler, door=_door(), max_errors=5, timeout=TIMEOUT)
        theirs = _timed(SMTP)(handler, timeout=TIMEOUT)
        assert await _timeouts(ours, steps, end) == await _timeouts(theirs, steps, end), (steps, end)


async def test_the_idle_timer_after_it_fired_and_after_the_connection_cancelled_it() -> None:
    conn = _timed(RelaisSMTP)(_Handler(), door=_door(), max_errors=5, timeout=TIMEOUT)
    assert await _timeouts(conn, [(0.0, None), (100.0, None)], 450.0) == [400.0]
    # A reset after it fired arms it again; so does one after aiosmtpd's connection_lost cancel.
    conn._reset_timeout()
    assert conn._timeout_handle is not None
    conn._timeout_handle.cancel()
    clock = conn.loop
    assert isinstance(clock, _Clock)
    conn._reset_timeout(10.0)
    clock.advance(1000.0)
    assert conn.fired == [400.0, 460.0]  # type: ignore[attr-defined]


async def test_connections_from_the_prototype_have_their_own_tables_in_aiosmtpd_order() -> None:
    handler = _Handler()
    prototype = Prototype()

    def make(p: Prototype | None) -> RelaisSMTP:
        return RelaisSMTP(handler, door=_door(), max_errors=5, prototype=p, auth_require_tls=False)

    make(prototype)
    one, two, real = make(prototype), make(prototype), make(None)
    for name in ("_auth_methods", "_handle_hooks", "_smtp_methods"):
        tables = [vars(conn)[name] for conn in (one, two, real)]
        # The order is what EHLO advertises (AUTH mechanisms) and HELP lists.
        assert [list(t) for t in tables[:2]] == [list(tables[2])] * 2, name
        assert tables[0] is not tables[1], name
    one._smtp_methods.pop("NOOP")
    assert "NOOP" in two._smtp_methods
    assert two._smtp_methods["NOOP"].__self__ is two
    assert two._handle_hooks["EHLO"].__self__ is handler
    assert two._auth_methods == real._auth_methods


def test_client_addresses_parsed_once_still_answer_each_list_of_networks() -> None:
    cases = ["127.0.0.1", "10.1.2.3", "192.0.2.7", "2001:db8::1", "::ffff:10.1.2.3", "", "nonsense", "10.1.2"]
    network_lists = [["127.0.0.0/8"], ["10.0.0.0/8", "2001:db8::/32"], ["192.0.2.0/24"], []]
    for _ in range(2):  # the second round answers from the cache
        for ip in cases:
            for networks in network_lists:
                try:
                    addr = ipaddress.ip_address(ip)
                    want = any(addr in ipaddress.ip_network(n, strict=False) for n in networks)
                except ValueError:
                    want = False
                assert in_networks(ip, networks) is want, (ip, networks)


class _Handoff:
    """Records what the handler hands over (the queueing itself is tested against NATS)."""

    def __init__(self) -> None:
        self.spans: list[tuple[object, object]] = []

    async def queue(self, sub: Submission, *, message_id: str | None = None, span: object = None) -> str:
        self.spans.append((span, trace.get_current_span()))
        return f"250 2.0.0 Ok: queued as {message_id}"


async def test_without_tracing_the_handoff_gets_the_span_the_no_op_tracer_would_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in a process that never installed a tracer provider (another test here may have).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(telemetry, "_installed", False)
    handoff = _Handoff()
    handler = IngressHandler(
        Config(),
        handoff,
        accounts=None,
        rates=None,
        sessions=None,
        auth=None,  # type: ignore[arg-type]
    )
    sub = Submission(
        account="acme",
        sender="a@example.com",
        recipients=("b@example.net",),
        sender_domain="example.com",
        data=b"",
    )
    for parent in ("", PARENT):
        token = otel_context.attach(telemetry.context_from_traceparent(parent))
        try:
            with trace.NoOpTracer().start_as_current_span("smtp receive") as expected:
                pass
            assert await handler._queue(None, sub, "m1") == "250 2.0.0 Ok: queued as m1"  # type: ignore[arg-type]
        finally:
            otel_context.detach(token)
        span, current = handoff.spans.pop()
        assert span is expected and current is expected
        assert telemetry.traceparent_of(span) == parent  # type: ignore[arg-type]
