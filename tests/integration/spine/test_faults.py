"""Durability: NATS outages answer 451 and lose nothing; killed services lose nothing."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from services.core.embedded import EmbeddedNats
from tests.support.relais import (
    SERVICES,
    RelaisStack,
    ServiceProcess,
    asubmit,
    config_to_toml,
    make_config,
    message,
    wait_for_events,
    wait_listening,
)


async def test_nats_down_answers_451_and_after_restart_the_same_message_goes_through(
    nats_server: EmbeddedNats, stack: RelaisStack, make_sink
) -> None:
    sink = make_sink("127.0.0.2")
    data = message(subject="Retry me")
    nats_server.stop()
    started = time.monotonic()
    code, reply = await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=data)
    assert code == 451 and reply.startswith(b"4.3.0"), (code, reply)
    assert time.monotonic() - started < 10, "the client must not hang when JetStream is gone"

    nats_server.start()
    deadline = time.monotonic() + 30
    while True:  # what a sending MTA does: retry the same message until it is accepted
        code, reply = await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=data)
        if code == 250 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert code == 250, reply
    got = await sink.async_wait_for(1, timeout=30)
    assert got[0].rcpt_tos == ["r@alpha.test"]
    await asyncio.sleep(2)
    # 451 means "not taken": only the copy that got 250 may be delivered.
    assert len(sink.messages) == 1


async def test_router_and_delivery_killed_mid_flight_lose_nothing(
    nats_server: EmbeddedNats, zone, sink_port: int, make_sink, tmp_path: Path
) -> None:
    sink = make_sink("127.0.0.2")
    sink.delay_data = 0.3  # keep deliveries in flight when the kill comes
    config = make_config(
        nats_url=nats_server.url, dns_port=zone.port, smtp_port=sink_port, nats={"ack_wait": 4.0}
    )
    path = tmp_path / "relais.toml"
    path.write_text(config_to_toml(config))
    procs = {name: ServiceProcess(name, path, tmp_path) for name in SERVICES}
    try:
        for proc in procs.values():
            proc.start()
        host, _, port = config.ingress.listen.rpartition(":")
        await asyncio.to_thread(wait_listening, (host, int(port)))
        total = 30
        for i in range(total):
            code, reply = await asubmit((host, int(port)), recipients=[f"u{i}@alpha.test"], data=message())
            assert code == 250, reply
            if i == 10:
                procs["router"].kill()
            if i == 12:
                procs["router"].start()
        await sink.async_wait_for(3, timeout=30)
        killed_at = time.time()
        procs["delivery"].kill()  # SIGKILL with SMTP transactions open
        await asyncio.sleep(1)
        procs["delivery"].start()

        await sink.async_wait_for(total, timeout=60)
        await wait_for_events(config.nats.url, "delivered", total, timeout=60)
        copies = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert set(copies) == {f"u{i}@alpha.test" for i in range(total)}, "every accepted message arrived"
        duplicates = sum(n - 1 for n in copies.values())
        print(f"\ndelivered {len(copies)}/{total}, duplicates: {duplicates}")
        # At-least-once: a copy is sent twice only when the worker died between the MX's 250
        # and its ack, i.e. the first copy reached the sink before the kill (the sink records
        # a message after its DATA delay, hence the margin); never more than it had in flight.
        first_copy = {}
        for m in sink.messages:
            for r in m.rcpt_tos:
                first_copy.setdefault(r, m.received_at)
        late = [r for r, n in copies.items() if n > 1 and first_copy[r] > killed_at + sink.delay_data + 1]
        assert not late, f"duplicates of messages that were not in flight at the kill: {late}"
        assert duplicates <= config.delivery.concurrency
    except Exception:
        for proc in procs.values():
            print(f"--- {proc.name} log ---\n{proc.log()[-3000:]}")
        raise
    finally:
        for proc in procs.values():
            proc.stop()
