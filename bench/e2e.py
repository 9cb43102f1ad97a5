"""End-to-end throughput of Relais against Postfix on this machine, with the same load and sink.

    .venv/bin/python bench/e2e.py                      # every row, 20,000 messages each
    .venv/bin/python bench/e2e.py --messages 500 --only relais-1n --only postfix
    .venv/bin/python bench/e2e.py --profile ingress    # py-spy on the ingress during each row

SMTP clients (Postfix's smtp-source: 20 sessions, a new connection per message) -> ingress ->
router -> delivery -> smtp-sink on 127.0.0.21, which dumps every transaction to a file whose
mtime is the arrival time. Relais' rows run on a fresh single-node NATS (R1) and on a fresh
3-node cluster (R3), one replica per service, then with the busiest service doubled. Postfix's
rows relay the same load through a private instance (bench/postfix.py) to the same kind of sink.

Measured per row: accepted and delivered messages/s, latency from the 250 to arrival at the
sink (p50/p99; the 250 time is the ingress's `accepted` event, matched to the sink's copy by the
queue id in Relais' Received header), CPU seconds per 1,000 messages and peak RSS per service
(/proc), and NATS messages per mail per service (nats-server /connz). `cpu_total` is the CPU of
all of a system's processes per 1,000 messages (the load driver's is apart); `cpu_vs_postfix` is
Postfix's over Relais' in the same round, above 1 when Relais spends less per message. Next to
`vs_postfix` it tells a CPU-bound row from one that waits (fsync, hand-offs). `sys_<process>` is
the share of a process's CPU spent in the kernel: in the services, mostly socket I/O; the rest is
Python. Prints a table and
writes JSON to bench/results/. Numbers on a shared machine are noisy; each row is a fixed
message count with a time cap, so the script always ends.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import postfix as postfix_mod  # noqa: E402
from bench.common import (  # noqa: E402
    SmtpSink,
    connz,
    cpu_split,
    ensure_postfix,
    peak_rss_mb,
    percentile,
    py_spy,
    smtp_source,
    stop_profilers,
    table,
)
from services.core.embedded import free_port, stop_process  # noqa: E402
from tests.support.cluster import Cluster, EventLog  # noqa: E402
from tests.support.relais import ACCOUNT, PASSWORD, SERVICES  # noqa: E402
from tests.support.signals import unwind_on_sigterm  # noqa: E402
from tests.support.smtp_load import Submission, run_load  # noqa: E402

DEST_DOMAIN = "dest.test"
DEST_IP = "127.0.0.21"
POSTFIX_IP = "127.0.0.20"
SENDER = "news@acme.test"
COMBOS = [(2048, 1), (51200, 1), (2048, 10), (51200, 10)]
SESSIONS = 20
# Issue #9: Postfix 3.7 on a quiet 2-core machine of the same kind (msg/s, end to end).
TARGETS = {(2048, 1): 592, (51200, 1): 448, (2048, 10): 361, (51200, 10): 302}


@dataclass
class Spec:
    system: str  # "relais" or "postfix"
    size: int
    rcpts: int
    nodes: int = 1
    replicas: dict[str, int] = field(default_factory=lambda: {s: 1 for s in SERVICES})

    @property
    def label(self) -> str:
        if self.system == "postfix":
            return "postfix"
        doubled = [s for s, n in self.replicas.items() if n > 1]
        return f"relais-{self.nodes}n" + "".join(f"+{s}x{self.replicas[s]}" for s in doubled)

    @property
    def load(self) -> str:
        return load_label(self.size, self.rcpts)


def load_label(size: int, rcpts: int) -> str:
    return f"{size // 1024}KB/{rcpts}rcpt"


# -- accounting snapshots --------------------------------------------------------------------------


def role_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def cpu_by_role(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds summed over each role's processes."""
    out: dict[str, tuple[float, float]] = {}
    for name, pid in pids.items():
        user, system = cpu_split(pid)
        before = out.get(role_of(name), (0.0, 0.0))
        out[role_of(name)] = (before[0] + user, before[1] + system)
    return out


def spent(before: tuple[float, float], after: tuple[float, float], n: int) -> tuple[float, float]:
    """CPU seconds per 1,000 messages between two (user, system) snapshots, and the share of
    it spent in the kernel (socket I/O, fsync) rather than in the process's own code."""
    user, system = after[0] - before[0], after[1] - before[1]
    total = user + system
    return total / n * 1000, system / total if total > 0 else 0.0


def rss_by_role(pids: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for name, pid in pids.items():
        out[role_of(name)] = max(out[role_of(name)], peak_rss_mb(pid))
    return dict(out)


def nats_msgs(cluster: Cluster) -> dict[str, tuple[int, int]]:
    total: dict[str, tuple[int, int]] = collections.defaultdict(lambda: (0, 0))
    for node in cluster.nats.nodes:
        if not node.monitor_port or node.process is None:
            continue
        with contextlib.suppress(OSError):
            for name, (pub, sub) in connz(node.monitor_url).items():
                a, b = total[name]
                total[name] = (a + pub, b + sub)
    return dict(total)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- load -------------------------------------------------------------------------------------------


def drive_smtp_source(targets: list[tuple[str, int]], spec: Spec, messages: int, cap: float) -> float:
    """Split the messages and sessions over the targets; returns when every smtp-source ended."""
    procs = []
    for i, (host, port) in enumerate(targets):
        share = messages // len(targets) + (1 if i < messages % len(targets) else 0)
        procs.append(
            smtp_source(
                host,
                port,
                messages=share,
                sessions=max(1, SESSIONS // len(targets)),
                size=spec.size,
                recipients=spec.rcpts,
                sender=SENDER,
                to=f"u@{DEST_DOMAIN}",
            )
        )
    deadline = time.monotonic() + cap
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_process(proc, grace=5)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.returncode:
            print(f"    smtp-source exited {proc.returncode}: {err[-300:]}")
    return time.time()


def drive_python(targets: list[tuple[str, int]], spec: Spec, messages: int) -> tuple[float, dict[str, float]]:
    """The aiosmtplib-free Python client with AUTH (when smtp-source cannot be used)."""
    body = ("X" * 76 + "\r\n") * max(1, spec.size // 78)
    subs = [
        Submission(
            f"m{i}",
            SENDER,
            tuple(f"{i}-{r}u@{DEST_DOMAIN}" for r in range(spec.rcpts)),
            (f"From: <{SENDER}>\r\nTo: <u@{DEST_DOMAIN}>\r\nSubject: bench {i}\r\n\r\n" + body).encode(),
        )
        for i in range(messages)
    ]
    results = asyncio.run(run_load(targets, subs, sessions=SESSIONS, auth=(ACCOUNT, PASSWORD)))
    accepted = {r.queue_id: r.replied_at for r in results if r.accepted}
    return max((r.replied_at for r in results), default=time.time()), accepted


def wait_for_sink(sink: SmtpSink, expected: int, cap: float, stalled_after: float = 30.0) -> None:
    deadline = time.monotonic() + cap
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sink.count()
        if count >= expected:
            return
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > stalled_after:
            print(f"    sink stalled at {count}/{expected}")
            return
        time.sleep(0.2)
    print(f"    time cap: sink has {sink.count()}/{expected}")


def clear_dir(path: Path) -> None:
    if path.exists():
        for p in path.iterdir():
            p.unlink()


# -- rows ---------------------------------------------------------------------------------------------


def run_relais(spec: Spec, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    dump = work / "dump"
    sinks: list[SmtpSink] = []

    def make_sink(host: str, port: int) -> SmtpSink:
        sinks.append(SmtpSink(host, port, dump))
        return sinks[-1]

    # Same destination concurrency as Postfix's default_destination_concurrency_limit (20).
    shaping = work / "shaping.toml"
    shaping.write_text(f"[default]\nconnections = {args.connections}\nmessages_per_connection = 100\n")
    cluster = Cluster(
        work,
        nats_nodes=spec.nodes,
        replicas=spec.replicas,
        domains={DEST_DOMAIN: DEST_IP},
        sink_factory=make_sink,
        nats_monitor=True,
        nats_sync_always=args.sync_always,
        # An MX's records live minutes (the harness's 1 s is for its DNS outage tests); Postfix's
        # rows look nothing up, relaying every message to one address.
        dns_ttl=300,
        nats={"ack_wait": 30.0, "publish_timeout": 5.0},
        delivery={"shaping_file": str(shaping)},
        ingress={
            "relay_networks": ["127.0.0.0/8"],
            "relay_networks_account": ACCOUNT,
            "max_connections_per_ip": 500,
        },
    )
    with cluster:
        sink = sinks[0]
        targets = cluster.ingress_addresses
        # Warm-up: connections, JIT-free Python imports, DNS cache, consumer state.
        warm = min(100, args.messages)
        if args.driver == "smtp-source":
            drive_smtp_source(targets, spec, warm, 60)
        else:
            drive_python(targets, spec, warm)
        wait_for_sink(sink, warm, 60)
        time.sleep(1.0)
        clear_dir(dump)
        events = EventLog(cluster.nats.urls)
        asyncio.run(events.poll())
        pids = cluster.pids()
        cpu0, msgs0, drv0 = cpu_by_role(pids), nats_msgs(cluster), children_cpu()
        profilers = start_profilers(args, cluster, work)
        t0 = time.time()
        accepted_at: dict[str, float] = {}
        if args.driver == "smtp-source":
            t_acc = drive_smtp_source(targets, spec, args.messages, args.time_cap)
        else:
            t_acc, accepted_at = drive_python(targets, spec, args.messages)
        driver_cpu = children_cpu() - drv0
        wait_for_sink(sink, args.messages, max(10.0, args.time_cap - (time.time() - t0)))
        cpu1, msgs1, rss = cpu_by_role(pids), nats_msgs(cluster), rss_by_role(pids)
        stop_profilers(profilers)
        new = asyncio.run(events.poll())
        accepted_events = {e.message_id: e.at for e in new if e.kind == "accepted"}
        delivered_events = sum(1 for e in new if e.kind == "delivered")
        accepted_at = accepted_at or accepted_events
        dumped = sink.scan()
        arrived = [d.received_at for d in dumped]
        latencies = [d.received_at - accepted_at[d.relais_id] for d in dumped if d.relais_id in accepted_at]
        accepted = len(accepted_at) or len(accepted_events)
        row: dict[str, Any] = {
            "system": spec.label,
            "load": spec.load,
            "messages": args.messages,
            "accepted": accepted,
            "delivered": len(dumped),
            "delivered_events": delivered_events,
            "accepted_per_s": accepted / max(1e-6, t_acc - t0),
            "delivered_per_s": len(dumped) / max(1e-6, (max(arrived) if arrived else t0) - t0),
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "driver_cpu_s_per_1k": driver_cpu / max(1, args.messages) * 1000,
        }
        n = max(1, len(dumped))
        for role in sorted(cpu1):
            row[f"cpu_{role}"], row[f"sys_{role}"] = spent(cpu0.get(role, (0.0, 0.0)), cpu1[role], n)
            row[f"rss_{role}_mb"] = rss.get(role, 0.0)
        row["cpu_total"] = sum(row[f"cpu_{role}"] for role in cpu1)
        for name in sorted(msgs1):
            if name.startswith("relais-"):
                pub = (msgs1[name][0] - msgs0.get(name, (0, 0))[0]) / n
                sub = (msgs1[name][1] - msgs0.get(name, (0, 0))[1]) / n
                row[f"nats_{name.removeprefix('relais-')}"] = f"{pub:.1f}/{sub:.1f}"
        return row


def run_postfix(spec: Spec, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port(POSTFIX_IP, DEST_IP)
    dump = work / "dump"
    sink = SmtpSink(DEST_IP, port, dump)
    instance = postfix_mod.PostfixInstance(work / "postfix", listen=(POSTFIX_IP, port), relay=(DEST_IP, port))
    sink.start()
    try:
        instance.start()
        warm = min(100, args.messages)
        drive_smtp_source([(POSTFIX_IP, port)], spec, warm, 60)
        wait_for_sink(sink, warm, 60)
        time.sleep(1.0)
        clear_dir(dump)
        master = instance.master_pid() or 0
        cpu0 = postfix_cpu(instance, master)
        drv0 = children_cpu()
        t0 = time.time()
        t_acc = drive_smtp_source([(POSTFIX_IP, port)], spec, args.messages, args.time_cap)
        driver_cpu = children_cpu() - drv0
        wait_for_sink(sink, args.messages, max(10.0, args.time_cap - (time.time() - t0)))
        cpu1 = postfix_cpu(instance, master)
        dumped = sink.scan()
        arrived = [d.received_at for d in dumped]
        n = max(1, len(dumped))
        cpu, kernel = spent(cpu0, cpu1, n)
        return {
            "system": spec.label,
            "load": spec.load,
            "messages": args.messages,
            "accepted": args.messages,
            "delivered": len(dumped),
            "accepted_per_s": args.messages / max(1e-6, t_acc - t0),
            "delivered_per_s": len(dumped) / max(1e-6, (max(arrived) if arrived else t0) - t0),
            "cpu_postfix": cpu,
            "sys_postfix": kernel,
            "cpu_total": cpu,
            # Summed over Postfix's processes, so shared pages count once per process.
            "rss_postfix_mb": sum(peak_rss_mb(p) for p in instance.pids()),
            "driver_cpu_s_per_1k": driver_cpu / max(1, args.messages) * 1000,
            "deferred_left": instance.deferred_count(),
        }
    finally:
        instance.stop()
        sink.stop()


def postfix_cpu(instance: postfix_mod.PostfixInstance, master: int) -> tuple[float, float]:
    """(user, system) of the master with its reaped children, plus the children alive now."""
    user, system = cpu_split(master, reaped=True)
    if not user and not system:
        return 0.0, 0.0
    for pid in instance.pids()[1:]:
        child = cpu_split(pid)
        user, system = user + child[0], system + child[1]
    return user, system


# -- profiling ---------------------------------------------------------------------------------------


def start_profilers(args: argparse.Namespace, cluster: Cluster, work: Path) -> list[subprocess.Popen[bytes]]:
    if not args.profile:
        return []
    binary = py_spy()
    procs = []
    for name, pid in cluster.pids().items():
        if role_of(name) == args.profile:
            out = RESULTS / f"profile-{args.profile}-{name}-{int(time.time())}.txt"
            procs.append(
                subprocess.Popen(
                    [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "-o", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return procs


def write_json(
    out: Path,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]] | None = None,
) -> None:
    meta = {
        "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "postfix": postfix_mod.version(),
        "driver": args.driver,
        "sessions": SESSIONS,
        "messages_per_row": args.messages,
        "relais_connections_per_destination": args.connections,
        "nats_sync_always": args.sync_always,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "medians": summary or []}, indent=2))


# -- main ----------------------------------------------------------------------------------------------

RESULTS = REPO / "bench" / "results"


def specs(args: argparse.Namespace) -> list[Spec]:
    combos = COMBOS if not args.quick else COMBOS[:1]
    if args.load:
        combos = [(s, r) for s, r in combos if load_label(s, r) in args.load]
    out = [Spec("postfix", s, r) for s, r in combos]
    out += [Spec("relais", s, r, nodes=1) for s, r in combos]
    out += [Spec("relais", s, r, nodes=3) for s, r in combos]
    return [s for s in out if not args.only or any(s.label.startswith(o) for o in args.only)]


COLUMNS = [
    "system",
    "load",
    "delivered",
    "accepted_per_s",
    "delivered_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_ingress",
    "cpu_router",
    "cpu_delivery",
    "cpu_nats",
    "cpu_postfix",
    "cpu_total",
    "driver_cpu_s_per_1k",
    "rss_ingress_mb",
    "rss_router_mb",
    "rss_delivery_mb",
    "rss_nats_mb",
]


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        if row.get("delivered_per_s"):
            groups[(row["system"], row["load"])].append(row)
    out = []
    for (system, load), group in groups.items():
        ratios = sorted(r["vs_postfix"] for r in group if "vs_postfix" in r)
        summary: dict[str, Any] = {
            "system": system,
            "load": load,
            "rounds": len(group),
            "delivered_per_s": statistics.median(r["delivered_per_s"] for r in group),
        }
        if ratios:
            summary["vs_postfix"] = statistics.median(ratios)
            summary["vs_postfix_range"] = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        cpu_ratios = sorted(r["cpu_vs_postfix"] for r in group if "cpu_vs_postfix" in r)
        if cpu_ratios:
            summary["cpu_vs_postfix"] = statistics.median(cpu_ratios)
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=20000,
        help="messages per row (default 20000, the count behind the reference Postfix figures)",
    )
    parser.add_argument("--time-cap", type=float, default=240.0, help="seconds per row before giving up")
    parser.add_argument("--only", action="append", help="rows whose system label starts with this")
    parser.add_argument("--quick", action="store_true", help="2KB/1rcpt only")
    parser.add_argument("--load", action="append", help="only this load, e.g. 50KB/1rcpt (repeatable)")
    parser.add_argument("--driver", choices=["smtp-source", "python"], default="smtp-source")
    parser.add_argument("--profile", choices=SERVICES, help="py-spy record this service in every Relais row")
    parser.add_argument("--sync-always", action="store_true", help="nats-server fsyncs every write")
    parser.add_argument(
        "--connections",
        type=int,
        default=20,
        help="Relais' connections per destination (Postfix default: 20)",
    )
    parser.add_argument("--no-bottleneck", action="store_true", help="skip the doubled-bottleneck rows")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, interleaved; a summary gives the median of each "
        "row and of its ratio to Postfix in the same round (noise on a shared machine)",
    )
    args = parser.parse_args(argv)
    ensure_postfix()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    plan = specs(args)

    out = RESULTS / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def run(spec: Spec, round_no: int) -> dict[str, Any]:
        print(f"-- {spec.label} {spec.load}: {args.messages} messages (round {round_no})", flush=True)
        row: dict[str, Any] = {"system": spec.label, "load": spec.load}
        # One retry: on a shared machine a freshly picked port can be taken before a server binds it.
        for attempt in (1, 2):
            with tempfile.TemporaryDirectory(prefix="relais-bench-") as tmp:
                os.chmod(tmp, 0o755)  # postfix and smtp-sink (user nobody) work below it
                runner = run_postfix if spec.system == "postfix" else run_relais
                started = time.monotonic()
                try:
                    row = runner(spec, args, Path(tmp))
                except Exception as exc:
                    print(f"   attempt {attempt} failed: {exc!r}"[:2000], flush=True)
                    row["error"] = repr(exc)[:500]
                    continue
                row["wall_s"] = time.monotonic() - started
                break
        row["issue_postfix_target"] = TARGETS.get((spec.size, spec.rcpts))
        row["round"] = round_no
        print(
            "   " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
        rows.append(row)
        write_json(out, args, rows)
        return row

    for round_no in range(1, args.rounds + 1):
        # Every other round runs the rows in reverse: the machine's load drifts within a round,
        # and rows that always ran first (Postfix's) would always get the same share of it.
        order = plan if round_no % 2 else plan[::-1]
        this_round = [run(spec, round_no) for spec in order]
        if args.no_bottleneck:
            continue
        for nodes in (1, 3):
            base = next(
                (r for r in this_round if r["system"] == f"relais-{nodes}n" and r["load"] == "2KB/1rcpt"),
                None,
            )
            if base is None or "error" in base:
                continue
            busiest = max(("ingress", "router", "delivery"), key=lambda s: base.get(f"cpu_{s}", 0.0))
            replicas = {s: 1 for s in SERVICES} | {busiest: 2}
            run(Spec("relais", 2048, 1, nodes=nodes, replicas=replicas), round_no)
    for row in rows:
        pf = next(
            (
                r
                for r in rows
                if r["system"] == "postfix" and r["load"] == row["load"] and r["round"] == row["round"]
            ),
            None,
        )
        if pf and row["system"] != "postfix" and pf.get("delivered_per_s") and row.get("delivered_per_s"):
            row["vs_postfix"] = row["delivered_per_s"] / pf["delivered_per_s"]
            if pf.get("cpu_total") and row.get("cpu_total"):
                # Above 1: Relais spends less CPU per message than Postfix did in the same round.
                row["cpu_vs_postfix"] = pf["cpu_total"] / row["cpu_total"]
    print()
    print(table(rows, [*COLUMNS, "vs_postfix", "cpu_vs_postfix"] + (["round"] if args.rounds > 1 else [])))
    summary = medians(rows) if args.rounds > 1 else []
    if summary:
        print(f"\nMedians over {args.rounds} rounds (ratio: to Postfix in the same round):")
        summary_columns = [
            "system",
            "load",
            "rounds",
            "delivered_per_s",
            "vs_postfix",
            "vs_postfix_range",
            "cpu_vs_postfix",
        ]
        print(table(summary, summary_columns))
    nats_cols = sorted({k for r in rows for k in r if k.startswith("nats_")})
    if nats_cols:
        print("\nNATS messages per mail, published/received, by client:")
        print(table([r for r in rows if r["system"] != "postfix"], ["system", "load", *nats_cols]))
    kernel_cols = sorted({k for r in rows for k in r if k.startswith("sys_")})
    if kernel_cols:
        print("\nShare of each one's CPU spent in the kernel (socket I/O, fsync), the rest in its own code:")
        print(table(rows, ["system", "load", *kernel_cols]))
    write_json(out, args, rows, summary)
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    raise SystemExit(main())
