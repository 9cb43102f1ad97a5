#!/usr/bin/env python3
"""Ingress throughput: accepted messages per second, and CPU per 1,000 messages.

A real nats-server (EmbeddedNats, file storage) and the ingress as its own OS process
(`python -m services.cli ingress`), nothing else: accepted mail stays in RELAIS_SUBMIT. 50
concurrent aiosmtplib clients each keep one session (EHLO [STARTTLS] AUTH, then MAIL/RCPT/DATA
per message), as bulk senders do; the "conn/msg" rows open a new session for every message.
Every row counts only `250` replies to DATA, i.e. messages JetStream acknowledged.

CPU is read from /proc/<pid>/stat of the ingress and of nats-server before and after each row;
"NATS pub/msg" is what the ingress published to NATS per accepted message (nats-server /connz):
each is one request JetStream answers, i.e. one round trip, awaited before the 250 or not.
The clients run in this process on the same machine, so figures on a small shared box are a
floor, not a ceiling. Nothing here is a test.

    python bench/ingest.py [--clients 50] [--small 1500] [--large 500]
    python bench/ingest.py --only "2 KB   1 rcpt  AUTH" --log-level INFO --profile /tmp/ingress.txt
    python bench/profile_summary.py /tmp/ingress.txt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import trustme

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import connz, cpu_seconds, py_spy, stop_profilers  # noqa: E402
from services.core.accounts import hash_password  # noqa: E402
from services.core.embedded import EmbeddedNats, free_port, stop_process, wait_for_port  # noqa: E402
from tests.support.signals import unwind_on_sigterm  # noqa: E402

PASSWORD = "bench-password-123"


def make_message(size: int, i: int) -> bytes:
    head = (
        f"From: Bench <news@bench.test>\r\nTo: someone@example.net\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}-{time.time_ns()}@bench.test>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor inc.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


@dataclass(frozen=True)
class Row:
    size: int
    recipients: int
    tls: bool
    per_message_connection: bool = False
    # An account with hourly/daily limits: two JetStream counter increments at end of DATA.
    limited: bool = False
    # No AUTH: the client is in relay_networks (how bench/e2e.py's smtp-source sends).
    relay: bool = False

    @property
    def label(self) -> str:
        session = "relay network" if self.relay else "STARTTLS+AUTH" if self.tls else "AUTH"
        reuse = "conn/msg" if self.per_message_connection else "reused"
        limits = " +limits" if self.limited else ""
        return f"{self.size // 1024:>3} KB  {self.recipients:>2} rcpt  {session:<13} {reuse:<8}{limits}"


@dataclass
class Result:
    row: Row
    accepted: int
    failed: int
    seconds: float
    ingress_cpu: float
    nats_cpu: float
    ingress_publishes: int


class Ingress:
    """One ingress process with its own config."""

    def __init__(self, base: Path, nats_url: str, tls: tuple[Path, Path] | None, log_level: str) -> None:
        self.port = free_port()
        tls_lines = f'tls_cert_file = "{tls[0]}"\ntls_key_file = "{tls[1]}"\n' if tls else ""
        config = base / f"ingress-{self.port}.toml"
        config.write_text(
            f'data_dir = "{base}"\n'
            f'[nats]\nurl = "{nats_url}"\npublish_timeout = 10.0\n'
            f'[ingress]\nlisten = "127.0.0.1:{self.port}"\nhostname = "relais.bench"\n'
            f"max_connections_per_ip = 1000\n{tls_lines}"
            'relay_networks = ["127.0.0.0/8"]\nrelay_networks_account = "bench"\n'
            '[telemetry]\nhttp_listen = ""\n'
            f'[accounts.bench]\npassword_hash = "{hash_password(PASSWORD)}"\ndomains = ["bench.test"]\n'
            f'[accounts.limited]\npassword_hash = "{hash_password(PASSWORD)}"\ndomains = ["bench.test"]\n'
            "max_messages_per_hour = 1000000000\nmax_messages_per_day = 1000000000\n"
        )
        self.log = open(base / f"ingress-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "ingress",
                "--config",
                str(config),
                "--log-level",
                log_level,
            ],
            cwd=REPO,
            stdout=self.log,
            stderr=self.log,
            env={k: v for k, v in os.environ.items() if not k.startswith(("RELAIS_", "OTEL_"))},
        )
        wait_for_port("127.0.0.1", self.port, timeout=60)

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


async def run_row(
    row: Row, ingress: Ingress, nats: EmbeddedNats, total: int, clients: int, ctx: ssl.SSLContext
) -> Result:
    data = make_message(row.size, 0)
    recipients = [f"r{i}@example.net" for i in range(row.recipients)]
    tickets = iter(range(total))
    accepted = failed = 0

    async def session() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ingress.port, start_tls=False, timeout=60)
        await smtp.connect()
        if row.tls:
            await smtp.starttls(tls_context=ctx)
        if not row.relay:
            await smtp.login("limited" if row.limited else "bench", PASSWORD)
        return smtp

    async def client() -> None:
        nonlocal accepted, failed
        smtp = None
        for _ in tickets:
            try:
                if smtp is None:
                    smtp = await session()
                _, reply = await smtp.sendmail("news@bench.test", recipients, data)
                accepted += reply.startswith("2.0.0 Ok: queued")
                if row.per_message_connection:
                    await smtp.quit()
                    smtp = None
            except (aiosmtplib.SMTPException, OSError):
                failed += 1
                smtp = None
        if smtp is not None:
            await smtp.quit()

    ingress_cpu, nats_cpu = cpu_seconds(ingress.process.pid), cpu_seconds(nats.process.pid)  # type: ignore[union-attr]
    published = ingress_publishes(nats)
    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.monotonic() - started
    return Result(
        row,
        accepted,
        failed,
        seconds,
        cpu_seconds(ingress.process.pid) - ingress_cpu,
        cpu_seconds(nats.process.pid) - nats_cpu,  # type: ignore[union-attr]
        ingress_publishes(nats) - published,
    )


def ingress_publishes(nats: EmbeddedNats) -> int:
    """Messages the ingress processes published to NATS so far (requests, KV puts, counters)."""
    return sum(pub for name, (pub, _) in connz(nats.monitor_url).items() if name == "relais-ingress")


def print_table(results: list[Result], clients: int) -> None:
    print()
    print(f"ingress: {clients} concurrent clients, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    header = (
        f"{'message':<50} {'accepted':>8} {'failed':>6} {'msg/s':>8} "
        f"{'ingress CPU s/1k':>16} {'nats CPU s/1k':>13} {'NATS pub/msg':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        per_k = 1000 / max(r.accepted, 1)
        print(
            f"{r.row.label:<50} {r.accepted:>8} {r.failed:>6} {r.accepted / r.seconds:>8.0f} "
            f"{r.ingress_cpu * per_k:>16.2f} {r.nats_cpu * per_k:>13.2f} "
            f"{r.ingress_publishes / max(r.accepted, 1):>12.2f}"
        )


def start_profilers(out: Path, ingresses: list[Ingress]) -> list[subprocess.Popen[bytes]]:
    """py-spy on each ingress process; the second one's file gets a `.tls` suffix."""
    binary = py_spy()
    procs = []
    for ingress, suffix in zip(ingresses, ("", ".tls"), strict=True):
        target = out.with_name(out.name + suffix)
        command = [binary, "record", "--pid", str(ingress.process.pid), "--format", "raw", "--rate", "250"]
        command += ["--nonblocking", "-o", str(target)]
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches before the first row starts
    return procs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--small", type=int, default=1500, help="messages per 2 KB row")
    parser.add_argument("--large", type=int, default=500, help="messages per 50 KB row")
    parser.add_argument("--only", default="", help="run only rows whose label contains this text")
    # Services run at INFO in production (and in bench/e2e.py); WARNING hides per-command logging.
    parser.add_argument("--log-level", default="WARNING", help="the ingress processes' --log-level")
    parser.add_argument("--profile", type=Path, help="py-spy record (raw) the ingresses into this file")
    args = parser.parse_args()
    rows = [
        Row(2 * 1024, 1, False),
        Row(2 * 1024, 10, False),
        Row(50 * 1024, 1, False),
        Row(50 * 1024, 10, False),
        Row(2 * 1024, 1, True),
        Row(2 * 1024, 10, True),
        Row(50 * 1024, 1, True),
        Row(50 * 1024, 10, True),
        Row(2 * 1024, 1, False, per_message_connection=True),
        Row(2 * 1024, 1, True, per_message_connection=True),
        Row(2 * 1024, 1, False, limited=True),
        Row(2 * 1024, 1, False, per_message_connection=True, relay=True),
    ]
    with tempfile.TemporaryDirectory(prefix="relais-bench-ingest-") as tmp:
        base = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "relais.bench")
        cert_file, key_file = base / "tls.crt", base / "tls.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        nats = EmbeddedNats(
            store_dir=base / "nats", port=0, log_file=base / "nats.log", monitor_port=free_port()
        )
        nats.start()
        plain = tls = None
        profilers: list[subprocess.Popen[bytes]] = []
        results = []
        try:
            plain = Ingress(base, nats.url, None, args.log_level)
            tls = Ingress(base, nats.url, (cert_file, key_file), args.log_level)
            # Warm-up: connections, the scrypt cache, stream files.
            await run_row(Row(2 * 1024, 1, False), plain, nats, 100, 10, client_ctx)
            await run_row(Row(2 * 1024, 1, True), tls, nats, 100, 10, client_ctx)
            if args.profile:
                profilers = start_profilers(args.profile, [plain, tls])
            for row in rows:
                if args.only not in row.label:
                    continue
                total = args.small if row.size < 10 * 1024 else args.large
                if row.per_message_connection:
                    total //= 2
                result = await run_row(row, tls if row.tls else plain, nats, total, args.clients, client_ctx)
                results.append(result)
                print(f"  {row.label}: {result.accepted} in {result.seconds:.1f}s", flush=True)
        finally:
            stop_profilers(profilers)
            for ingress in (plain, tls):
                if ingress is not None:
                    ingress.stop()
            nats.stop()
        print_table(results, args.clients)


if __name__ == "__main__":
    unwind_on_sigterm()
    asyncio.run(main())
