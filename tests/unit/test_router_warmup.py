"""Warm-up schedules and source choice under daily caps (counters kept in a dict here; the
NATS KV counters are exercised in tests/integration/router/test_warmup_*.py)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime

import pytest

from services.core.config import Config, ConfigError, PoolConfig, SourceConfig, WarmupConfig, validate
from services.router.warmup import (
    ALL_SCOPE,
    OTHER_SCOPE,
    Limit,
    counter_key,
    limits_for,
    pick_source,
    weighted_order,
)

DAY1 = date(2026, 12, 1)
NOW_DAY1 = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()


class DictCounters:
    def __init__(self) -> None:
        self.values: Counter[str] = Counter()

    async def add(self, key: str, count: int, cap: int | None) -> bool:
        if cap is not None and self.values[key] >= cap:
            return False
        self.values[key] += count
        return True


def _config(overflow: str = "warm", **schedule: object) -> Config:
    warming = SourceConfig(address="127.0.0.5", weight=1, warmup="new", warmup_start="2026-12-01")
    warm = SourceConfig(address="127.0.0.6", weight=1)
    return Config(
        pools={"default": PoolConfig(), "p": PoolConfig(sources=[warming, warm])},
        warmup={"new": WarmupConfig(daily=[2, 4, 8], overflow=overflow, **schedule)},  # type: ignore[arg-type]
    )


def test_caps_grow_day_by_day_and_end_with_the_schedule() -> None:
    config = _config()
    source = config.pools["p"].sources[0]
    caps = [limits_for(config, source, "any", date(2026, 12, d)).limits for d in (1, 2, 3, 4, 30)]
    assert caps == [(Limit(OTHER_SCOPE, 2),), (Limit(OTHER_SCOPE, 4),), (Limit(OTHER_SCOPE, 8),), (), ()]
    assert limits_for(config, source, "any", date(2026, 11, 1)).limits == (Limit(OTHER_SCOPE, 2),), (
        "before start: day 1"
    )


def test_a_site_with_its_own_schedule_is_counted_apart() -> None:
    config = _config(sites={"google": [1, 1, 1, 1, 1]})
    source = config.pools["p"].sources[0]
    assert limits_for(config, source, "google", date(2026, 12, 5)).limits == (Limit("google", 1),)
    assert limits_for(config, source, "yahoo", date(2026, 12, 5)).limits == ()


def test_a_permanent_daily_cap_adds_an_all_sites_limit() -> None:
    config = _config()
    source = SourceConfig(address="127.0.0.7", daily_cap=100, warmup="new", warmup_start="2026-12-01")
    candidate = limits_for(config, source, "x", DAY1)
    assert candidate.limits == (Limit(ALL_SCOPE, 100), Limit(OTHER_SCOPE, 2))
    assert candidate.warming
    assert not limits_for(config, SourceConfig(address="127.0.0.8", daily_cap=5), "x", DAY1).warming


def test_weighted_order_puts_each_source_first_by_its_weight() -> None:
    rng = random.Random(1)
    sources = [SourceConfig(address="a", weight=3), SourceConfig(address="b", weight=1)]
    firsts = Counter(weighted_order(sources, rng)[0].address for _ in range(4000))
    assert 2800 < firsts["a"] < 3200


def test_counter_keys_are_valid_kv_keys() -> None:
    assert counter_key(DAY1, "2001:db8::1", "google") == "20261201.2001_db8__1.google"


async def test_full_warming_source_overflows_to_the_warm_one() -> None:
    config, counters = _config(), DictCounters()
    rng = random.Random(3)
    picks = [await pick_source(config, counters, "p", "s", 1, now=NOW_DAY1, rng=rng) for _ in range(40)]
    by_source = Counter(p.source for p in picks)
    assert by_source["127.0.0.5"] == 2, "day 1 cap of the warming source"
    assert by_source["127.0.0.6"] == 38
    assert not any(p.defer for p in picks)


async def test_full_warming_source_defers_when_configured() -> None:
    config, counters = _config(overflow="defer"), DictCounters()
    rng = random.Random(3)
    picks = [await pick_source(config, counters, "p", "s", 1, now=NOW_DAY1, rng=rng) for _ in range(40)]
    assert Counter(p.source for p in picks if not p.defer)["127.0.0.5"] == 2
    assert any(p.defer for p in picks), "jobs drawn to the full warming source wait"
    assert any(p.source == "127.0.0.6" for p in picks), "the warm source still takes its share"


async def test_every_source_full_defers() -> None:
    config = Config(
        pools={
            "default": PoolConfig(),
            "p": PoolConfig(sources=[SourceConfig(address="127.0.0.5", daily_cap=1)]),
        }
    )
    counters = DictCounters()
    first = await pick_source(config, counters, "p", "s", 1, now=NOW_DAY1, rng=random.Random())
    second = await pick_source(config, counters, "p", "s", 1, now=NOW_DAY1, rng=random.Random())
    assert first.source == "127.0.0.5" and second.defer


async def test_uncapped_pools_leave_the_choice_to_delivery() -> None:
    config = Config(
        pools={"default": PoolConfig(), "p": PoolConfig(sources=[SourceConfig(address="127.0.0.5")])}
    )
    pick = await pick_source(config, DictCounters(), "p", "s", 1, now=NOW_DAY1, rng=random.Random())
    assert pick.source == "" and not pick.defer
    after = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    pick = await pick_source(_config(), DictCounters(), "p", "s", 1, now=after, rng=random.Random())
    assert pick.source == "" and not pick.defer, "schedule over: nothing to pin"


def test_config_rejects_unknown_schedules_and_bad_dates() -> None:
    bad_ref = Config(
        pools={"default": PoolConfig(sources=[SourceConfig(address="127.0.0.5", warmup="nope")])}
    )
    with pytest.raises(ConfigError, match="unknown schedule"):
        validate(bad_ref)
    bad_date = Config(
        pools={
            "default": PoolConfig(
                sources=[SourceConfig(address="127.0.0.5", warmup="w", warmup_start="soon")]
            )
        },
        warmup={"w": WarmupConfig(daily=[1])},
    )
    with pytest.raises(ConfigError, match="warmup_start"):
        validate(bad_date)
    # The shape of a date but no day of the calendar: routing raised for every job of the pool,
    # which was retried without end and never delivered nor bounced.
    for impossible in ("2026-02-30", "2026-13-01", "2026-00-10"):
        source = SourceConfig(address="127.0.0.5", warmup="w", warmup_start=impossible)
        no_such_day = Config(
            pools={"default": PoolConfig(sources=[source])}, warmup={"w": WarmupConfig(daily=[1])}
        )
        with pytest.raises(ConfigError, match="warmup_start"):
            validate(no_such_day)
    with pytest.raises(ConfigError, match="overflow"):
        validate(Config(warmup={"w": WarmupConfig(daily=[1], overflow="drop")}))
