#!/usr/bin/env python3
"""Routing decisions per second: MX resolution + site rollup for many distinct domains.

Runs the router's decision function (`services.router.service.destination`) with the real
shared resolver (`make_resolver`: dnspython + Relais' capped TTL cache) against the loopback DNS
server from the test support, serving N distinct recipient domains whose MX hosts belong to a
handful of providers. First a cold pass (every domain asked once over UDP), then warm passes
over the cached answers, sequentially and with the router's default concurrency. Prints a
table; nothing here is a test.

With --pipeline, also runs the whole `RouterService.route` against an embedded nats-server:
account lookup, suppression check per recipient (KV), MX + site, and the JetStream publish of
the delivery job (acknowledged), for single-recipient messages with a warm DNS cache.

With --consume, runs the router service as deployed (`RouterService.run`: pull, decode, route,
publish, ack) over N messages already queued on `relais.submit`, once per recipient count in
--rcpts (all of a message's recipients in one domain, a few of them suppressed), and reports
messages/s, the router's CPU per 1,000 messages and the NATS messages its connection sent and
received per message (nats-server /connz): the round trips the router pays per message.

    python bench/route.py [--domains 10000] [--rounds 3] [--pipeline 3000] [--consume 3000 --rcpts 1,10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.config import DnsConfig, SiteConfig
from services.core.dns import make_resolver
from services.router.service import destination
from services.router.sites import SiteRules
from tests.support.dns_server import DNSServer
from tests.support.signals import unwind_on_sigterm

PROVIDERS = 20  # hosting providers; every 4th domain uses the "bigmail" provider (a site rule)


def populate(server: DNSServer, count: int) -> list[str]:
    domains = []
    for p in range(PROVIDERS):
        for m in (1, 2):
            server.add(f"mx{m}.hoster{p}.test", "A", f"127.1.{p}.{m}", ttl=3600)
    for m in (1, 2, 3):
        server.add(f"mx{m}.bigmail.test", "A", f"127.2.0.{m}", ttl=3600)
    for i in range(count):
        domain = f"d{i:05d}.example"
        if i % 4 == 0:
            server.add(
                domain, "MX", "10 mx1.bigmail.test.", "10 mx2.bigmail.test.", "20 mx3.bigmail.test.", ttl=3600
            )
        else:
            p = i % PROVIDERS
            server.add(domain, "MX", f"10 mx1.hoster{p}.test.", f"20 mx2.hoster{p}.test.", ttl=3600)
        domains.append(domain)
    return domains


async def run_pass(resolver, rules, domains: list[str], concurrency: int) -> tuple[float, Counter[str]]:
    sites: Counter[str] = Counter()
    started = time.perf_counter()
    if concurrency <= 1:
        for domain in domains:
            sites[(await destination(resolver, rules, domain)).site] += 1
    else:
        for i in range(0, len(domains), concurrency):
            batch = domains[i : i + concurrency]
            for dest in await asyncio.gather(*(destination(resolver, rules, d) for d in batch)):
                sites[dest.site] += 1
    return time.perf_counter() - started, sites


async def main_async(count: int, rounds: int) -> None:
    with DNSServer("127.0.0.1") as server:
        domains = populate(server, count)
        resolver = make_resolver(DnsConfig(servers=[f"127.0.0.1:{server.port}"], timeout=5.0))
        rules = SiteRules.from_config({"bigmail": SiteConfig(mx=["*.bigmail.test"])})
        rows = []
        cold, sites = await run_pass(resolver, rules, domains, concurrency=64)
        queries_cold = len(server.queries)
        rows.append(("cold cache, 64 concurrent", count, cold))
        for label, conc in (("warm cache, sequential", 1), ("warm cache, 64 concurrent", 64)):
            best = min([(await run_pass(resolver, rules, domains, conc))[0] for _ in range(rounds)])
            rows.append((label, count, best))
        queries_warm = len(server.queries) - queries_cold

    print(f"\nrouting decisions (MX resolution + site rollup), {count} distinct recipient domains")
    print(f"{'pass':<28}{'decisions':>10}{'seconds':>10}{'decisions/s':>14}")
    for label, n, seconds in rows:
        print(f"{label:<28}{n:>10}{seconds:>10.3f}{n / seconds:>14,.0f}")
    print(f"\nDNS queries: cold pass {queries_cold}, warm passes {queries_warm} (cache hits only)")
    print(f"sites: {len(sites)} distinct for {count} domains; largest: {sites.most_common(1)[0]}")


async def pipeline(count: int, domains: int) -> None:
    import tempfile

    from services.core.bus import connect
    from services.core.config import AccountConfig, Config, NatsConfig
    from services.core.envelope import BodyRef, Envelope
    from services.core.topology import ensure_topology
    from services.router.service import RouterService
    from tests.support.nats import start_nats

    with tempfile.TemporaryDirectory() as tmp, DNSServer("127.0.0.1") as server:
        names = populate(server, domains)
        nats_server = start_nats(Path(tmp))
        try:
            config = Config(
                nats=NatsConfig(url=nats_server.url),
                dns=DnsConfig(servers=[f"127.0.0.1:{server.port}"]),
                accounts={"bench": AccountConfig(password_hash="scrypt$x", domains=["bench.test"])},
            )
            bus = await connect(config.nats, "bench-route")
            await ensure_topology(bus.js, config)
            router = RouterService(config, bus)
            body = BodyRef(size=100, inline=b"Subject: x\r\n\r\nbody\r\n" * 4)

            def env(i: int) -> Envelope:
                rcpt = f"r{i}@{names[i % len(names)]}"
                return Envelope(
                    id=f"b{i:08d}",
                    sender="a@bench.test",
                    recipients=(rcpt,),
                    account="bench",
                    sender_domain="bench.test",
                    body=body,
                )

            for i in range(0, len(names), 64):  # warm the DNS cache through the router itself
                await asyncio.gather(*(router._resolve(d) for d in names[i : i + 64]))
            started = time.perf_counter()
            for i in range(0, count, 64):
                await asyncio.gather(*(router.route(env(j)) for j in range(i, min(count, i + 64))))
            seconds = time.perf_counter() - started
            await bus.close()
        finally:
            nats_server.stop()
    print(f"\nRouterService.route, {count} single-recipient messages, 64 concurrent, warm DNS cache")
    print(f"{'messages':>10}{'seconds':>10}{'messages/s':>14}")
    print(f"{count:>10}{seconds:>10.3f}{count / seconds:>14,.0f}")


async def consume(count: int, domains: int, rcpts: int, size: int = 100) -> dict[str, float]:
    """The router service as deployed over `count` queued messages of `rcpts` recipients each."""
    import tempfile

    from bench.common import connz
    from services.core.bus import connect
    from services.core.config import AccountConfig, Config, NatsConfig
    from services.core.embedded import EmbeddedNats, free_port
    from services.core.envelope import BodyRef, Envelope
    from services.core.suppression import Suppression, SuppressionList
    from services.core.topology import (
        DELIVER_STREAM,
        SUBMIT_CONSUMER,
        SUBMIT_STREAM,
        ensure_topology,
        submit_subject,
    )
    from services.router.service import RouterService

    with tempfile.TemporaryDirectory() as tmp, DNSServer("127.0.0.1") as server:
        names = populate(server, domains)
        nats_server = EmbeddedNats(store_dir=Path(tmp) / "nats", monitor_port=free_port())
        nats_server.start()
        try:
            config = Config(
                nats=NatsConfig(url=nats_server.url),
                dns=DnsConfig(servers=[f"127.0.0.1:{server.port}"]),
                accounts={"bench": AccountConfig(password_hash="scrypt$x", domains=["bench.test"])},
            )
            feeder = await connect(config.nats, "bench-feeder")
            await ensure_topology(feeder.js, config)
            suppression = SuppressionList(feeder.js)
            for i in range(0, count * rcpts, 97):  # about 1% of the recipients are suppressed
                domain = names[(i // rcpts) % len(names)]
                await suppression.add(Suppression("bench", f"r{i}@{domain}", "manual"))
            line = b"x" * 76 + b"\r\n"
            data = b"Subject: x\r\n\r\n" + line * max(1, size // len(line))
            body = BodyRef(size=len(data), inline=data)
            sem = asyncio.Semaphore(256)

            async def queue(i: int) -> None:
                domain = names[i % len(names)]
                env = Envelope(
                    id=f"c{i:08d}",
                    sender="a@bench.test",
                    recipients=tuple(f"r{i * rcpts + k}@{domain}" for k in range(rcpts)),
                    account="bench",
                    sender_domain="bench.test",
                    body=body,
                )
                async with sem:
                    await feeder.publish(submit_subject(), env.to_msgpack(), msg_id=env.id)

            await asyncio.gather(*(queue(i) for i in range(count)))
            bus = await connect(config.nats, "bench-router")
            router = RouterService(config, bus)
            for i in range(0, len(names), 64):  # warm the DNS cache through the router itself
                await asyncio.gather(*(router._resolve(d) for d in names[i : i + 64]))
            before = connz(nats_server.monitor_url).get("bench-router", (0, 0))
            stop = asyncio.Event()
            cpu0, started = time.process_time(), time.perf_counter()
            task = asyncio.create_task(router.run(stop))
            while True:
                await asyncio.sleep(0.05)
                info = await feeder.js.stream_info(DELIVER_STREAM)
                # a fully suppressed message yields no job: count routed messages by the submit stream
                router = await feeder.js.consumer_info(SUBMIT_STREAM, SUBMIT_CONSUMER)
                if router.num_pending == 0 and router.num_ack_pending == 0 and info.state.messages > 0:
                    break
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
            after = connz(nats_server.monitor_url).get("bench-router", (0, 0))
            stop.set()
            await task
            await bus.close()
            await feeder.close()
        finally:
            nats_server.stop()
    return {
        "rcpts": rcpts,
        "messages": count,
        "seconds": seconds,
        "rate": count / seconds,
        "cpu_per_1000": cpu / count * 1000,
        "nats_out": (after[0] - before[0]) / count,
        "nats_in": (after[1] - before[1]) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="warm passes per mode; the best is shown")
    parser.add_argument("--pipeline", type=int, default=0, help="also route N messages through NATS")
    parser.add_argument(
        "--consume", type=int, default=0, help="run the router service over N queued messages"
    )
    parser.add_argument("--rcpts", default="1,10", help="recipients per message for --consume")
    parser.add_argument("--size", type=int, default=100, help="inline body bytes for --consume")
    parser.add_argument("--skip-decisions", action="store_true", help="skip the MX decision passes")
    args = parser.parse_args()
    if not args.skip_decisions:
        asyncio.run(main_async(args.domains, args.rounds))
    if args.pipeline:
        asyncio.run(pipeline(args.pipeline, min(args.domains, 2000)))
    if args.consume:
        domains = min(args.domains, 2000)
        rows = [asyncio.run(consume(args.consume, domains, int(n), args.size)) for n in args.rcpts.split(",")]
        print(f"\nRouterService.run (pull, route, publish, ack), {args.consume} x {args.size} B messages")
        header = f"{'rcpts':>6}{'seconds':>10}{'msgs/s':>10}{'CPU s/1000':>12}"
        print(f"{header}{'NATS out/msg':>14}{'NATS in/msg':>13}")
        for r in rows:
            print(
                f"{r['rcpts']:>6}{r['seconds']:>10.2f}{r['rate']:>10,.0f}{r['cpu_per_1000']:>12.2f}"
                f"{r['nats_out']:>14.2f}{r['nats_in']:>13.2f}"
            )


if __name__ == "__main__":
    unwind_on_sigterm()
    main()
