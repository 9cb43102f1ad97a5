"""Warm-up schedules and source choice under daily caps (counters kept in a dict here; the
NATS KV counters are exercised in tests/integration/router/test_warmup_*.py)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime

import pytest

from services.core.config import (
    Config,
    ConfigError,
    PoolConfig,
    SiteConfig,
    SourceConfig,
    WarmupConfig,
    validate,
)
from services.router.warmup import (
    ALL_SCOPE,
    OTHER_SCOPE,
    Limit,
    Pick,
    Stored,
    counter_key,
    limits_for,
    pick_source,
    verdict_key,
    weighted_order,
)

DAY1 = date(2026, 12, 1)
NOW_DAY1 = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()


class DictCounters:
    """Keys with revisions, written all or nothing, as the KV bucket's atomic batches are."""

    def __init__(self) -> None:
        self.entries: dict[str, Stored] = {}
        self.revision = 0

    def value(self, key: str) -> int:
        entry = self.entries.get(key)
        return int(entry.value or b"0") if entry else 0

    async def read(self, keys: Sequence[str]) -> dict[str, Stored]:
        return {key: self.entries[key] for key in keys if key in self.entries}

    async def write_all(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        current = {key: self.entries[key].revision if key in self.entries else 0 for key in writes}
        if any(current[key] != expected for key, (_, expected) in writes.items()):
            return False
        for key, (value, _) in writes.items():
            self.revision += 1
            self.entries[key] = Stored(value, self.revision)
        return True


_jobs = itertools.count()


async def _pick(
    config: Config, counters: DictCounters, rng: random.Random, job: str = "", *, now: float
) -> Pick:
    """pick_source for one recipient of a job of its own (first attempt) unless `job` names one."""
    job = job or f"{next(_jobs):023x}-0.0"  # job_msg_id: job key (message id, job number), attempt
    return await pick_source(config, counters, "p", "s", 1, job=job, now=now, rng=rng)


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
    picks = [await _pick(config, counters, rng, now=NOW_DAY1) for _ in range(40)]
    by_source = Counter(p.source for p in picks)
    assert by_source["127.0.0.5"] == 2, "day 1 cap of the warming source"
    assert by_source["127.0.0.6"] == 38
    assert not any(p.defer for p in picks)
    assert {p.day for p in picks if p.source == "127.0.0.5"} == {"2026-12-01"}
    assert {p.day for p in picks if p.source == "127.0.0.6"} == {""}, "uncapped: any day may send it"


async def test_full_warming_source_defers_when_configured() -> None:
    config, counters = _config(overflow="defer"), DictCounters()
    rng = random.Random(3)
    picks = [await _pick(config, counters, rng, now=NOW_DAY1) for _ in range(40)]
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
    first = await _pick(config, counters, random.Random(), now=NOW_DAY1)
    second = await _pick(config, counters, random.Random(), now=NOW_DAY1)
    assert first.source == "127.0.0.5" and second.defer


async def test_uncapped_pools_leave_the_choice_to_delivery() -> None:
    config = Config(
        pools={"default": PoolConfig(), "p": PoolConfig(sources=[SourceConfig(address="127.0.0.5")])}
    )
    pick = await _pick(config, DictCounters(), random.Random(), now=NOW_DAY1)
    assert pick.source == "" and not pick.defer
    after = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    pick = await _pick(_config(), DictCounters(), random.Random(), now=after)
    assert pick.source == "" and not pick.defer, "schedule over: nothing to pin"


WARMING_KEY = counter_key(DAY1, "127.0.0.5", OTHER_SCOPE)
JOB = "0123456789abcdef01234-0"


def _only_warming(overflow: str = "warm") -> Config:
    config = _config(overflow=overflow)
    config.pools["p"].sources.pop()  # the warm source: every pick is the warming one or a wait
    return config


async def test_a_repeated_pass_takes_the_stored_verdict_and_counts_nothing() -> None:
    config, counters = _config(), DictCounters()
    first = await _pick(config, counters, random.Random(3), job=f"{JOB}.0", now=NOW_DAY1)
    # Whatever order the repeat draws, it keeps the first pass's source and its single count.
    repeats = [
        await _pick(config, counters, random.Random(seed), job=f"{JOB}.0", now=NOW_DAY1) for seed in range(20)
    ]
    assert set(repeats) == {first}
    assert counters.value(WARMING_KEY) == (1 if first.source == "127.0.0.5" else 0)
    assert verdict_key(f"{JOB}.0") in counters.entries


async def test_a_pick_carries_the_day_it_was_counted_for_even_when_repeated_the_next_day() -> None:
    config, counters = _only_warming(), DictCounters()
    first = await _pick(config, counters, random.Random(), job=f"{JOB}.0", now=NOW_DAY1)
    assert first == Pick(source="127.0.0.5", day="2026-12-01")
    next_day = datetime(2026, 12, 2, 0, 5, tzinfo=UTC).timestamp()
    again = await _pick(config, counters, random.Random(), job=f"{JOB}.0", now=next_day)
    assert again == first, "counted on the 1st: delivery must see that day, not the 2nd"
    assert counters.value(counter_key(date(2026, 12, 2), "127.0.0.5", OTHER_SCOPE)) == 0


async def test_a_repeated_pass_defers_as_the_first_one_did_even_with_room_now() -> None:
    config, counters = _only_warming(overflow="defer"), DictCounters()
    counters.entries[WARMING_KEY] = Stored(b"2", 1)  # day 1's cap of the warming source: full
    assert (await _pick(config, counters, random.Random(), job=f"{JOB}.0", now=NOW_DAY1)).defer
    counters.entries[WARMING_KEY] = Stored(b"0", 99)  # an operator reset the day's counter
    again = await _pick(config, counters, random.Random(), job=f"{JOB}.0", now=NOW_DAY1)
    assert again.defer, "the deferral is the job's stored fate: a delivery job now would be a second"
    assert counters.value(WARMING_KEY) == 0


async def test_a_retried_job_counts_again() -> None:
    config, counters = _only_warming(), DictCounters()
    for attempt in range(2):
        pick = await _pick(config, counters, random.Random(), job=f"{JOB}.{attempt}", now=NOW_DAY1)
        assert pick.source == "127.0.0.5"
    assert counters.value(WARMING_KEY) == 2, "the provider sees each attempt"


class _Contended(DictCounters):
    """Another replica counts one recipient on the warming source just before each of our first
    two writes, so they find the counter moved."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = 0

    async def write_all(self, writes: Mapping[str, tuple[bytes, int]]) -> bool:
        if self.raced < 2:
            self.raced += 1
            entry = self.entries.get(WARMING_KEY)
            theirs = (str(self.value(WARMING_KEY) + 1).encode(), entry.revision if entry else 0)
            assert await super().write_all({WARMING_KEY: theirs})
        return await super().write_all(writes)


async def test_a_lost_compare_and_set_reads_again() -> None:
    config, counters = _only_warming(overflow="defer"), _Contended()
    pick = await _pick(config, counters, random.Random(), now=NOW_DAY1)
    assert pick.defer, "the two racing counts filled day 1's cap of 2"
    assert counters.value(WARMING_KEY) == 2


async def test_a_source_full_on_one_of_its_caps_counts_on_none() -> None:
    source = SourceConfig(address="127.0.0.7", daily_cap=100, warmup="new", warmup_start="2026-12-01")
    config = Config(
        pools={"default": PoolConfig(), "p": PoolConfig(sources=[source])}, warmup=_config().warmup
    )
    counters = DictCounters()
    counters.entries[counter_key(DAY1, "127.0.0.7", OTHER_SCOPE)] = Stored(b"2", 1)
    assert (await _pick(config, counters, random.Random(), now=NOW_DAY1)).defer
    assert counters.value(counter_key(DAY1, "127.0.0.7", ALL_SCOPE)) == 0


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


def _site_schedule(site: str, **rules: list[str]) -> Config:
    """A warming source whose schedule caps one site only (no `daily`)."""
    source = SourceConfig(address="127.0.0.5", warmup="new", warmup_start="2026-12-01")
    return Config(
        pools={"default": PoolConfig(sources=[source])},
        warmup={"new": WarmupConfig(sites={site: [1, 2]})},
        sites={name: SiteConfig(mx=mx) for name, mx in rules.items()},
    )


@pytest.mark.parametrize("site", ["gmail", "Google", "google.com.", "Bücher.test"])
def test_a_schedule_for_a_site_the_router_never_names_is_refused(site: str) -> None:
    """The router names a destination's site by a [sites] rule, else by the registrable domain
    of its MX host (lower case, A-labels): a schedule under any other name never applied, so
    the warming source sent to that site with no cap at all when `daily` was empty."""
    config = _site_schedule(site, google=["*.google.com"])
    source = config.pools["default"].sources[0]
    assert limits_for(config, source, "google", DAY1).limits == (), "what such a schedule did"
    with pytest.raises(ConfigError, match=f"warmup.new.sites.{site}"):
        validate(config)


@pytest.mark.parametrize("site", ["google", "google.com", "192.0.2.1"])
def test_a_schedule_for_a_site_the_router_may_name_loads(site: str) -> None:
    validate(_site_schedule(site, google=["*.google.com"]))
