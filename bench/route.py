#!/usr/bin/env python3
"""Routing decisions per second: MX resolution + site rollup for many distinct domains.

Runs the router's decision function (`services.router.service.destination`) with the real
shared resolver (`make_resolver`: dnspython + Relais' capped TTL cache) against the loopback DNS
server from the test support, serving N distinct recipient domains whose MX hosts belong to a
handful of providers. First a cold pass (every domain asked once over UDP), then warm passes
over the cached answers, sequentially and with the router's default concurrency. Prints a
table; nothing here is a test.

    python bench/route.py [--domains 10000] [--rounds 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="warm passes per mode; the best is shown")
    args = parser.parse_args()
    asyncio.run(main_async(args.domains, args.rounds))


if __name__ == "__main__":
    main()
