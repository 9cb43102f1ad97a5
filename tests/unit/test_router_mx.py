"""MX record rules without DNS: preference order, shuffling equals, null MX, IP-literal targets."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

from services.core.outcome import NULL_MX
from services.router.mx import NO_MAIL_HOST, mx_route, order_mx


def test_lowest_preference_first() -> None:
    assert order_mx([(30, "c"), (10, "a"), (20, "b")]) == ("a", "b", "c")


def test_equal_preferences_are_shuffled_evenly() -> None:
    rng = random.Random(7)
    firsts = Counter(order_mx([(10, "a"), (10, "b"), (20, "z")], rng)[0] for _ in range(2000))
    assert set(firsts) == {"a", "b"}
    assert 800 < firsts["a"] < 1200
    assert all(order_mx([(10, "a"), (10, "b"), (20, "z")], rng)[-1] == "z" for _ in range(50))


def test_duplicate_hosts_appear_once() -> None:
    assert order_mx([(10, "a"), (20, "a"), (30, "b")]) == ("a", "b")


def test_null_mx_is_a_permanent_failure() -> None:
    route = mx_route([(0, ".")])
    assert route.failure == NULL_MX and route.is_permanent_failure and route.hosts == ()


def test_primary_hosts_are_the_best_preference_sorted() -> None:
    route = mx_route([(20, "c"), (10, "b"), (10, "a")])
    assert route.primary == ("a", "b")
    assert route.hosts[2] == "c"


def test_ip_literal_targets_are_kept_or_dropped_by_config() -> None:
    assert mx_route([(10, "127.0.0.5")]).hosts == ("127.0.0.5",)
    assert mx_route([(10, "127.0.0.5"), (20, "mx.test")], ip_literals=False).hosts == ("mx.test",)
    assert mx_route([(10, "127.0.0.5")], ip_literals=False).failure == NO_MAIL_HOST


def test_hosts_are_capped_by_preference_after_the_shuffle() -> None:
    records = [(20 + i, f"b{i}") for i in range(1500)] + [(10, f"a{i}") for i in range(12)]
    routes = [mx_route(records) for _ in range(200)]
    assert all(len(r.hosts) == 10 for r in routes)
    assert all(set(r.hosts) <= {f"a{i}" for i in range(12)} for r in routes), "best preference first"
    assert len({h for r in routes for h in r.hosts}) == 12, "which ten of the twelve best varies"
    assert routes[0].primary == tuple(sorted(f"a{i}" for i in range(12))), "site naming sees them all"


def _cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def test_ordering_many_hosts_costs_in_proportion_to_their_number() -> None:
    # A zone anyone can set up may list a few thousand MX hosts (a 64 KiB answer), and every
    # message to the domain is routed through mx_route: four times the hosts, not sixteen times
    # the work (each host was looked for in the list of those already kept).
    def cost(n: int) -> float:
        records = [(10 + i % 5, f"mx{i:05d}.many.test") for i in range(n)]
        return min(_cpu_seconds(lambda: mx_route(records)) for _ in range(3))

    small, large = cost(2000), cost(8000)
    assert large < 8 * small, (small, large)
