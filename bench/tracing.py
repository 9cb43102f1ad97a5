"""What tracing costs: the same load through Relais with `telemetry.traces` off and on.

    .venv/bin/python bench/tracing.py                   # 2 rounds x (off, on), 400 messages each
    .venv/bin/python bench/tracing.py --messages 1000 --rounds 3

Each row starts a fresh embedded nats-server and the four services as real processes
(`python -m services.cli <service>`, exactly as deployed), in capture delivery mode so no remote
MX is involved, then submits N messages over SMTP from `--clients` concurrent sessions (one
connection each, AUTH once, RSET between messages). "on" is the laptop setting: every span
exported by the SDK's batch processor to a JSON-lines file (the same code path as OTLP up to the
exporter). Rows alternate off/on so drift on a shared machine hits both alike.

Measured per row: accepted messages/s (SMTP), end-to-end delivered/s (first submission until the
N-th `delivered` event), and CPU seconds per 1,000 messages of each service (/proc). Also a
micro figure: the cost of one producer + consumer span pair in this process. Prints a table;
nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from bench.common import cpu_seconds, table  # noqa: E402
from services.core.config import DeliveryConfig, TelemetryConfig  # noqa: E402
from services.core.embedded import EmbeddedNats, wait_for_port  # noqa: E402
from services.core.topology import PREFIX  # noqa: E402
from tests.support.relais import ACCOUNT, PASSWORD, SENDER_DOMAIN, ServiceProcess, config_to_toml, make_config  # noqa: E402

SERVICES = ("router", "delivery", "bounce", "ingress")
BODY = (
    f"From: Bench <news@{SENDER_DOMAIN}>\r\nTo: r@dest.test\r\nSubject: tracing bench\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n" + "Hello, traced world.\r\n" * 40
).encode()
from tests.support.signals import unwind_on_sigterm  # noqa: E402


def submit_all(address: tuple[str, int], total: int, clients: int, deadline: float) -> int:
    """N messages from `clients` concurrent SMTP sessions; returns how many got a 250."""
    counter = iter(range(total))
    lock = threading.Lock()
    accepted = [0]

    def worker() -> None:
        with smtplib.SMTP(*address, timeout=60) as smtp:
            smtp.ehlo("bench.test")
            smtp.login(ACCOUNT, PASSWORD)
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                smtp.sendmail(f"news@{SENDER_DOMAIN}", [f"r{i}@dest.test"], BODY)
                with lock:
                    accepted[0] += 1
                smtp.rset()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted[0]


async def count_delivered(url: str, total: int, done: asyncio.Event, seen: list[float]) -> None:
    nc = await nats.connect(url)
    count = 0

    async def on_msg(msg: object) -> None:
        nonlocal count
        count += 1
        if count >= total:
            seen.append(time.monotonic())
            done.set()

    await nc.subscribe(f"{PREFIX}.events.*.delivered", cb=on_msg)
    try:
        await done.wait()
    finally:
        await nc.close()


def run_row(mode: str, messages: int, clients: int, workdir: Path, time_cap: float) -> dict[str, object]:
    row_dir = Path(tempfile.mkdtemp(prefix=f"tracing-{mode}-", dir=workdir))
    server = EmbeddedNats(store_dir=row_dir / "nats", port=0, log_file=row_dir / "nats.log")
    server.start()
    procs: list[ServiceProcess] = []
    try:
        config = make_config(nats_url=server.url)
        config = dataclasses.replace(
            config,
            delivery=DeliveryConfig(mode="capture", capture_dir=str(row_dir / "mailbox")),
            telemetry=TelemetryConfig(
                traces="jsonl" if mode == "on" else "none",
                traces_file=str(row_dir / "traces.jsonl"),
                http_listen="",
            ),
        )
        path = row_dir / "relais.toml"
        path.write_text(config_to_toml(config))
        for name in SERVICES:
            proc = ServiceProcess(name, path, row_dir, env={"RELAIS_CONFIG": str(path)})
            proc.start()
            procs.append(proc)
        host, _, port = config.ingress.listen.rpartition(":")
        wait_for_port(host, int(port), timeout=60)
        time.sleep(1.0)  # consumers bound
        cpu_before = {p.name: cpu_seconds(p.process.pid) for p in procs if p.process}

        done = asyncio.Event()
        seen: list[float] = []
        loop = asyncio.new_event_loop()
        counter = threading.Thread(
            target=loop.run_until_complete,
            args=(asyncio.wait_for(count_delivered(server.url, messages, done, seen), time_cap),),
        )
        counter.start()
        time.sleep(0.3)
        start = time.monotonic()
        accepted = submit_all((host, int(port)), messages, clients, start + time_cap)
        submitted = time.monotonic()
        counter.join()
        loop.close()
        end = seen[0] if seen else float("nan")
        cpu = {p.name: cpu_seconds(p.process.pid) - cpu_before[p.name] for p in procs if p.process}
        row: dict[str, object] = {
            "tracing": mode,
            "messages": accepted,
            "accepted/s": accepted / (submitted - start),
            "delivered/s": messages / (end - start) if seen else 0.0,
        }
        for name in SERVICES:
            row[f"cpu s/1k {name}"] = cpu[name] / max(accepted, 1) * 1000
    finally:
        for proc in procs:
            proc.stop()  # SIGTERM: each service flushes its batch span processor
        server.stop()
    traces = row_dir / "traces.jsonl"
    row["spans"] = sum(1 for _ in traces.open()) if traces.exists() else 0
    return row


def span_pair_micro(n: int = 20000) -> tuple[float, float]:
    """CPU µs per producer+consumer span pair: with the SDK (batch processor to a file) and without."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from services.core import telemetry

    def loop() -> float:
        # CPU time of the whole process (the exporter thread included), not wall time: on a
        # shared machine the wall clock mostly measures the neighbours.
        started = time.process_time()
        for i in range(n):
            headers: dict[str, str] = {}
            with telemetry.producer_span("relais.submit", headers, {telemetry.MESSAGE_ID: str(i)}):
                pass
            with telemetry.consumer_span("relais.submit", headers, {telemetry.MESSAGE_ID: str(i)}):
                pass
        return (time.process_time() - started) / n * 1e6

    off = loop()  # no provider installed yet: the API's no-op tracer
    with tempfile.TemporaryDirectory() as tmp:
        provider = TracerProvider()
        # Room for every span of the loop: a tight loop outruns any export thread, and a dropped
        # span would make "on" look cheaper than it is.
        exporter = telemetry.JsonLinesExporter(Path(tmp) / "t.jsonl")
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=4 * n))
        telemetry.install_provider(provider)
        on = loop()
        provider.shutdown()
    return off, on


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per row at most")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="relais-bench-tracing-") as tmp:
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                row = run_row(mode, args.messages, args.clients, Path(tmp), args.time_cap)
                print(f"  round {r + 1} tracing {mode}: {row['delivered/s']:.0f} delivered/s", flush=True)
                rows.append(row)
    columns = [
        "tracing",
        "messages",
        "accepted/s",
        "delivered/s",
        *(f"cpu s/1k {n}" for n in SERVICES),
        "spans",
    ]
    print()
    print(table(rows, columns))

    def median(mode: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in rows if r["tracing"] == mode)  # type: ignore[arg-type]

    print()
    summary = []
    for key in ("accepted/s", "delivered/s", *(f"cpu s/1k {n}" for n in SERVICES)):
        off, on = median("off", key), median("on", key)
        summary.append({"median": key, "off": off, "on": on, "on/off": on / off if off else float("nan")})
    print(table(summary, ["median", "off", "on", "on/off"]))
    off_us, on_us = span_pair_micro()
    print()
    print(
        f"producer+consumer span pair, CPU: {off_us:.1f} µs without an SDK, "
        f"{on_us:.1f} µs with it (export included)"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (shared: treat ratios, not absolutes)")
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    raise SystemExit(main())
