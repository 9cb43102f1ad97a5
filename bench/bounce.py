#!/usr/bin/env python3
"""Bounce pipeline figures: parse+classify, VERP, inbound bounces through JetStream, webhooks.

    python bench/bounce.py [--inbound 500] [--events 2000]

CPU figures run over the vendored flufl.bounce corpus (116 real bounces). The JetStream figures
start an embedded nats-server in a temporary directory and the bounce service in this process:
N async bounces (Postfix DSNs to valid VERP addresses) published to relais.inbound until every
one became a suppression entry and an event; then N events posted to a local HTTP receiver in
batches. Prints a table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.bounce.classify import DEFAULT_RULES  # noqa: E402
from services.bounce.parse import parse_bounce, parse_message  # noqa: E402
from services.bounce.service import BounceService  # noqa: E402
from services.core.bus import Bus  # noqa: E402
from services.core.config import AccountConfig, BounceConfig, Config, NatsConfig  # noqa: E402
from services.core.embedded import EmbeddedNats, free_port  # noqa: E402
from services.core.envelope import BodyRef, Envelope, new_message_id  # noqa: E402
from services.core.events import Event, publish_event  # noqa: E402
from services.core.returnpath import parse_verp, verify, verp_address  # noqa: E402
from services.core.runtime import start_bus  # noqa: E402
from services.core.topology import EVENTS_STREAM, inbound_subject  # noqa: E402
from tests.support.bounce_samples import postfix_dsn  # noqa: E402
from tests.support.signals import unwind_on_sigterm  # noqa: E402

SECRET = "bench-secret-0123456789"
DOMAIN = "bounces.bench.test"
CORPUS = REPO / "tests" / "data" / "flufl_bounce"


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


def cpu_figures(rows: list[tuple[str, str, str]]) -> None:
    samples = [p.read_bytes() for p in sorted(CORPUS.glob("*.txt"))]
    rounds = 5
    started = time.perf_counter()
    for _ in range(rounds):
        for raw in samples:
            parse_bounce(parse_message(raw), DEFAULT_RULES)
    elapsed = time.perf_counter() - started
    rows.append(
        ("parse + classify (corpus)", f"{rounds * len(samples)} msgs", rate(rounds * len(samples), elapsed))
    )

    n = 20_000
    ids = [new_message_id() for _ in range(n)]
    started = time.perf_counter()
    addresses = [
        verp_address(
            prefix="b", domain=DOMAIN, secret=SECRET, account="acme", message_id=i, recipients=["a@x.test"]
        )
        for i in ids
    ]
    rows.append(("VERP encode", f"{n}", rate(n, time.perf_counter() - started)))
    started = time.perf_counter()
    for address in addresses:
        path = parse_verp(address, prefix="b", domain=DOMAIN)
        assert path is not None and verify(path, "a@x.test", [SECRET])
    rows.append(("VERP parse + verify", f"{n}", rate(n, time.perf_counter() - started)))


class Receiver(BaseHTTPRequestHandler):
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with Receiver.lock:
            Receiver.received += len(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def jetstream_figures(rows: list[tuple[str, str, str]], inbound: int, events: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        nats = EmbeddedNats(store_dir=Path(tmp) / "nats", port=free_port())
        nats.start()
        try:
            config = Config(
                nats=NatsConfig(url=nats.url),
                bounce=BounceConfig(
                    verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET], webhook_batch=100
                ),
                accounts={
                    "acme": AccountConfig(
                        password_hash="scrypt$bench",
                        webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook",
                        webhook_secret="whsec-bench-0123456789",
                    )
                },
            )
            bus = await start_bus(config, "bench")
            stop = asyncio.Event()
            service_bus = await start_bus(config, "bench-bounce")
            task = asyncio.create_task(BounceService(config, service_bus).run(stop))
            try:
                await inbound_figure(rows, bus, inbound)
                await webhook_figure(rows, bus, events, inbound)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
                await service_bus.close()
                await bus.close()
        finally:
            nats.stop()
            server.shutdown()


async def inbound_figure(rows: list[tuple[str, str, str]], bus: Bus, n: int) -> None:
    async def one(i: int) -> None:
        rcpt = f"user{i}@alpha.test"
        to = verp_address(
            prefix="b",
            domain=DOMAIN,
            secret=SECRET,
            account="acme",
            message_id=new_message_id(),
            recipients=[rcpt],
        )
        raw = postfix_dsn(to=to, recipient=rcpt)
        env = Envelope(
            id=new_message_id(),
            sender="",
            recipients=(to,),
            account="",
            sender_domain="",
            body=BodyRef(size=len(raw), inline=raw),
            kind="inbound",
        )
        await bus.publish(inbound_subject(), env.to_msgpack(), msg_id=env.id)

    started = time.perf_counter()
    for chunk in range(0, n, 50):  # 50 publishes in flight, like several ingress sessions
        await asyncio.gather(*(one(i) for i in range(chunk, min(n, chunk + 50))))
    published = time.perf_counter() - started
    for _ in range(2400):  # at most 120 s
        if (await bus.js.stream_info(EVENTS_STREAM)).state.messages >= n:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    rows.append(("async bounces -> suppression + event", f"{n}", rate(n, elapsed)))
    rows.append(("  (publishing them alone)", f"{n}", rate(n, published)))


async def until(done: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)


async def webhook_figure(rows: list[tuple[str, str, str]], bus: Bus, n: int, already: int) -> None:
    # The inbound figure's events are posted too; count from where the receiver stands.
    await until(lambda: Receiver.received >= already, 60)
    base = Receiver.received
    started = time.perf_counter()
    for i in range(n):
        event = Event(
            kind="delivered", message_id=new_message_id(), account="acme", recipients=[f"r{i}@x.test"]
        )
        await publish_event(bus, event)
    await until(lambda: Receiver.received - base >= n, 120)
    rows.append(
        (
            "events -> webhook (batches of 100)",
            f"{Receiver.received - base}",
            rate(n, time.perf_counter() - started),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inbound", type=int, default=500)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    cpu_figures(rows)
    asyncio.run(jetstream_figures(rows, args.inbound, args.events))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'count':>10}  {'rate':>10}")
    for what, count, speed in rows:
        print(f"{what:<{width}}  {count:>10}  {speed:>10}")


if __name__ == "__main__":
    unwind_on_sigterm()
    main()
