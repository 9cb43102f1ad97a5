#!/usr/bin/env python3
"""Delivery throughput: delivered messages per second to a fast local sink, with connection reuse.

For each (body size, delivery processes) case: a fresh embedded nats-server, Postfix's
`smtp-sink` on 127.0.0.2 as the MX, the loopback DNS server from the test support, N delivery
jobs published straight to `relais.deliver.default` (the router is not measured here), then
1 or 4 real `relais delivery` processes started together. Measured from the moment the jobs are
queued and the workers are ready until N `delivered` events are in the events stream; CPU is
the delivery processes' user+system time over that interval (/proc), per 1,000 messages; NATS
messages are those the delivery processes' connections sent and received per delivered
message (nats-server /connz): the round trips delivery pays per message.

    python bench/deliver.py [--messages 2000] [--sizes 2048,51200] [--procs 1,4] [--rate 0]
    python bench/deliver.py --data-delay 1 --messages 640 --sizes 2048 --procs 1,2

--data-delay makes the MX answer DATA after that many seconds (smtp-sink -w; whole seconds), as
a slow remote MX does: delivery is then bound by its jobs in flight per process (32 here), not by
CPU, which shows how delivery replicas add capacity on a machine whose cores the CPU-bound rows
already fill. The site's connection cap is raised so that it does not bind instead.

Shaping is wide open for the run (one site, up to 32 connections, 1,000 messages per
connection) so what is measured is the delivery path itself: NATS pull + ack, envelope decode,
SMTP over reused connections, events and schedules. --rate adds a messages-per-minute rule to
the site, so that every job also takes a cluster-wide rate slot (shaping KV). Prints a table;
nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SmtpSink, connz, cpu_seconds  # noqa: E402
from services.core.config import DeliveryConfig, PoolConfig, replace  # noqa: E402
from services.core.embedded import EmbeddedNats, free_port  # noqa: E402
from services.core.envelope import BodyRef, Envelope, new_message_id  # noqa: E402
from services.core.runtime import start_bus  # noqa: E402
from services.core.topology import EVENTS_STREAM, deliver_subject  # noqa: E402
from tests.support.dns_server import DNSServer  # noqa: E402
from tests.support.relais import ServiceProcess, config_to_toml, make_config  # noqa: E402
from tests.support.signals import unwind_on_sigterm  # noqa: E402

SINK_HOST = "127.0.0.2"
CONCURRENCY = 32
SHAPING = """
[site."bench.test"]
messages_per_connection = 1000
"""


def body_of(size: int) -> bytes:
    head = (
        b"From: bench@acme.test\r\nTo: r@bench.test\r\nSubject: bench\r\n"
        b"Message-ID: <bench@acme.test>\r\nMIME-Version: 1.0\r\n\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def publish_jobs(config, count: int, size: int) -> None:
    bus = await start_bus(config, "bench-publisher")
    body = body_of(size)
    try:
        sem = asyncio.Semaphore(256)

        async def one(i: int) -> None:
            async with sem:
                mid = new_message_id()
                env = Envelope(
                    id=mid,
                    job_id=f"{mid}-0",
                    sender="bench@acme.test",
                    recipients=(f"r{i}@bench.test",),
                    account="acme",
                    sender_domain="acme.test",
                    body=BodyRef(size=len(body), inline=body),
                    pool="default",
                    domain="bench.test",
                    site="bench.test",
                    mx_hosts=("mx.bench.test",),
                )
                await bus.publish(deliver_subject("default"), env.to_msgpack(), msg_id=env.job_id)

        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await bus.nc.close()


def wait_ready(workers: list[ServiceProcess], timeout: float = 120.0) -> None:
    """Until every worker logged that it started (imports done, topology checked, pulling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all("relais delivery started" in w.log() for w in workers):
            time.sleep(0.5)  # its first pull request is on its way
            return
        if any(w.process is not None and w.process.poll() is not None for w in workers):
            break
        time.sleep(0.2)
    raise TimeoutError("delivery workers did not start:\n" + "\n".join(w.log()[-2000:] for w in workers))


async def delivered_events(config) -> int:
    bus = await start_bus(config, "bench-counter")
    try:
        info = await bus.js.stream_info(EVENTS_STREAM, subjects_filter="relais.events.*.delivered")
        return sum((info.state.subjects or {}).values())
    finally:
        await bus.nc.close()


def delivery_nats(monitor_url: str) -> tuple[int, int]:
    """(messages sent, messages received) by every delivery worker's NATS connection."""
    counts = [v for name, v in connz(monitor_url).items() if name.startswith("relais-delivery")]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def run_case(
    workdir: Path, dns: DNSServer, count: int, size: int, procs: int, rate: int = 0, data_delay: int = 0
) -> dict[str, float]:
    nats = EmbeddedNats(store_dir=workdir / "nats", log_file=workdir / "nats.log", monitor_port=free_port())
    nats.start()
    sink_port = free_port(SINK_HOST)
    sink = SmtpSink(SINK_HOST, sink_port, data_delay=data_delay)
    sink.start()
    workers: list[ServiceProcess] = []
    try:
        shaping = workdir / "shaping.toml"
        # A messages-per-minute rule makes every job take a cluster-wide rate slot (KV).
        # The site's connection cap: every worker's jobs in flight when the MX is slow (one
        # connection each), the usual 32 otherwise.
        connections = CONCURRENCY * procs if data_delay else 32
        shaping.write_text(
            SHAPING + f"connections = {connections}\n" + (f"messages_per_minute = {rate}\n" if rate else "")
        )
        config = make_config(nats_url=nats.url, dns_port=dns.port, smtp_port=sink_port)
        config = replace(
            config,
            delivery=DeliveryConfig(
                smtp_port=sink_port,
                connect_timeout=5.0,
                command_timeout=30.0,
                concurrency=CONCURRENCY,
                shaping_file=str(shaping),
                mta_sts=False,
            ),
            pools={"default": PoolConfig()},
            telemetry={"http_listen": ""},
        )
        cfg_path = workdir / "relais.toml"
        cfg_path.write_text(config_to_toml(config))
        for _ in range(procs):
            worker = ServiceProcess("delivery", cfg_path, workdir)
            worker.start()
            workers.append(worker)
        wait_ready(workers)
        started = time.perf_counter()
        cpu0 = sum(cpu_seconds(w.process.pid) for w in workers if w.process)
        nats0 = delivery_nats(nats.monitor_url)
        asyncio.run(publish_jobs(config, count, size))
        deadline = started + 600
        done = 0
        while time.perf_counter() < deadline:
            done = asyncio.run(delivered_events(config))
            if done >= count:
                break
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(w.process.pid) for w in workers if w.process) - cpu0
        nats1 = delivery_nats(nats.monitor_url)
        if done < count:
            print(
                f"  only {done}/{count} delivered; worker log:\n{workers[0].log()[-3000:]}", file=sys.stderr
            )
        return {
            "delivered": done,
            "seconds": elapsed,
            "rate": done / elapsed,
            "cpu_per_1000": cpu / max(done, 1) * 1000,
            "nats_out": (nats1[0] - nats0[0]) / max(done, 1),
            "nats_in": (nats1[1] - nats0[1]) / max(done, 1),
        }
    finally:
        for w in workers:
            w.stop()
        sink.stop()
        nats.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="2048,51200")
    parser.add_argument("--procs", default="1,4")
    parser.add_argument("--rate", type=int, default=0, help="site messages_per_minute (0: unlimited)")
    parser.add_argument("--data-delay", type=int, default=0, help="seconds before the MX answers DATA")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(p) for p in args.procs.split(",")]
    rows = []
    with DNSServer("127.0.0.1") as dns:
        dns.add("bench.test", "MX", "10 mx.bench.test.")
        dns.add("mx.bench.test", "A", SINK_HOST)
        for size in sizes:
            for n in procs:
                with tempfile.TemporaryDirectory(prefix="relais-bench-deliver-") as tmp:
                    result = run_case(Path(tmp), dns, args.messages, size, n, args.rate, args.data_delay)
                rows.append((size, n, result))
                print(
                    f"  {size // 1024:>3} KB x {n} proc: {result['rate']:,.0f} msg/s, "
                    f"{result['cpu_per_1000']:.2f} CPU s/1000",
                    file=sys.stderr,
                )
    print()
    rule = f", site rate {args.rate}/min" if args.rate else ""
    rule += f", MX answers DATA after {args.data_delay} s" if args.data_delay else ""
    print(f"Delivery to a local smtp-sink, {args.messages} messages per case, connection reuse on{rule}")
    header = ("body", "procs", "delivered", "seconds", "msgs/s", "CPU s / 1000 msgs", "NATS out/in per msg")
    print(
        f"{header[0]:>6}  {header[1]:>5}  {header[2]:>9}  {header[3]:>8}  {header[4]:>8}  {header[5]:>18}"
        f"  {header[6]:>19}"
    )
    for size, n, r in rows:
        print(
            f"{size // 1024:>4}KB  {n:>5}  {r['delivered']:>9.0f}  {r['seconds']:>8.1f}  {r['rate']:>8,.0f}  "
            f"{r['cpu_per_1000']:>18.2f}  {r['nats_out']:>9.2f}/{r['nats_in']:.2f}"
        )
    out = REPO / "bench" / "results" / f"deliver-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps([{"size": s, "procs": n, **r} for s, n, r in rows], indent=2))


if __name__ == "__main__":
    unwind_on_sigterm()
    main()
