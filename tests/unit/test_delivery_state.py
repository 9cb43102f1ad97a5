"""Pure parts of cross-replica shaping state, source choice, and the delay-warning contract."""

from __future__ import annotations

import time

import pytest

from services.core.config import RetryConfig
from services.core.disposition import DELAY_WARNED, wants_delay_warning
from services.core.envelope import BounceNotice, Envelope
from services.core.outcome import Bounced, Reply
from services.core.pause import parse_pause_key, pause_key
from services.delivery import sources
from services.delivery.control import Backoff, backoff_key
from services.delivery.limits import (
    BLOCK_HORIZON,
    LEASE_TTL,
    MAX_BLOCK,
    SLOT_GRACE,
    _Clock,
    block_size,
    fair_share,
    grant,
    lease_key,
    next_slot,
    slot_key,
)
from services.delivery.service import SLOT_INTERVAL_META, SLOT_META, _parse_slot, _Slot
from services.delivery.smtp_session import Source
from services.delivery.sources import SourceHealth, choose_source
from tests.support.relais import an_envelope


def test_gcra_spaces_slots_by_the_interval_and_never_goes_back_in_time() -> None:
    slot, after = next_slot(tat=0.0, now=100.0, interval=2.0)
    assert (slot, after) == (100.0, 102.0)
    slot, after = next_slot(tat=after, now=100.5, interval=2.0)
    assert (slot, after) == (102.0, 104.0)
    slot, _ = next_slot(tat=104.0, now=200.0, interval=2.0)
    assert slot == 200.0, "an idle period is not saved up as a burst"


def test_a_block_of_slots_moves_the_clock_by_one_interval_per_slot() -> None:
    slot, after = next_slot(tat=0.0, now=100.0, interval=0.25, count=4)
    assert (slot, after) == (100.0, 101.0)


def test_blocks_follow_demand_within_the_horizon() -> None:
    assert block_size(0.1, 1) == 1, "a lone job takes a single slot, as without blocks"
    assert block_size(0.1, 6) == 6
    assert block_size(0.1, 100) == int(BLOCK_HORIZON / 0.1)
    assert block_size(0.001, 100) == MAX_BLOCK
    assert block_size(60.0, 50) == 1, "slow sites: one slot per CAS"


def test_held_slots_are_handed_out_in_order_and_stale_ones_dropped() -> None:
    clock = _Clock(interval=0.5)
    clock.slots.extend([10.0, 10.5, 11.0, 11.5])
    assert clock.take(now=9.0) == 10.0
    assert clock.take(now=10.5 + SLOT_GRACE / 2) == 10.5, "a little late is still this slot"
    assert clock.take(now=11.4) == 11.5, "11.0 passed unused: dropped, never sent in a burst"
    assert clock.take(now=11.4) is None


def test_keys_are_valid_kv_keys_for_ipv4_ipv6_and_host_names() -> None:
    assert slot_key("msg", "192.0.2.1", "google") == "msg.192_0_2_1.google"
    assert slot_key("conn", "2001:db8::1", "mx.a.test") == "conn.2001_db8__1.mx_a_test"
    assert slot_key("msg", "", "x") == "msg._.x"
    assert lease_key("192.0.2.1", "google") == "lease.192_0_2_1.google"
    assert backoff_key("192.0.2.1", "mx.a.test") == "backoff.192_0_2_1.mx_a_test"


def test_connection_cap_is_shared_fairly_between_workers_that_want_connections() -> None:
    now = 1000.0
    record: dict = {}
    for _ in range(4):
        record, ok = grant(record, "a", 4, now)
        assert ok, "alone, a worker may use the whole cap"
    record, ok = grant(record, "a", 4, now)
    assert not ok and record["a"][0] == 4, "never above the cap"
    record, ok = grant(record, "b", 4, now)
    assert not ok and record["b"][2] > now, "b is recorded as wanting"
    record["a"][0] -= 1  # a closes a connection...
    record, ok = grant(record, "a", 4, now)
    assert not ok, "...and may not take it back while b waits below its share"
    record, ok = grant(record, "b", 4, now)
    assert ok and record["b"][0] == 1
    assert fair_share(4, 2) == 2 and fair_share(5, 2) == 3 and fair_share(1, 3) == 1


def test_a_crashed_workers_connections_lapse() -> None:
    now = 1000.0
    record = {"dead": [4, now - 1, 0.0]}
    record, ok = grant(record, "b", 4, now)
    assert ok and "dead" not in record
    assert record["b"][1] == now + LEASE_TTL


def test_a_workers_own_entry_counts_what_it_really_holds() -> None:
    now = 1000.0
    # NATS was away past the renewal: the entry lapsed, but its 2 connections are still open.
    record, ok = grant({"a": [2, now - 5, 0.0]}, "a", 3, now, held=2)
    assert ok and record["a"][0] == 3
    record, ok = grant(record, "b", 3, now)
    assert not ok, "the cap is full"
    # A release that failed left the count one too high: what the worker holds corrects it.
    record, ok = grant({"a": [1, now + 10, 0.0]}, "a", 1, now, held=0)
    assert ok and record["a"][0] == 1


def test_backoff_round_trips() -> None:
    state = Backoff(time.time() + 60, 6.0, "generic-throttle", "421 4.7.0 slow down")
    assert Backoff.from_bytes(state.to_bytes()) == state
    assert state.interval() == 10.0


def test_pause_keys_round_trip() -> None:
    assert parse_pause_key(pause_key("site", "google")) == ("site", "google")
    assert parse_pause_key(pause_key("source", "2001:db8::1")) == ("source", "2001:db8::1")


def test_pinned_source_is_used_when_usable_else_a_weighted_pick() -> None:
    a, b = Source("192.0.2.1", "a.test"), Source("192.0.2.2", "b.test")
    assert choose_source([(a, 1), (b, 1)], pinned="192.0.2.2") == b
    assert choose_source([(a, 1)], pinned="192.0.2.2") == a
    assert choose_source([], pinned="192.0.2.2") is None


def _env(**kw: object) -> Envelope:
    kw.setdefault("sender", "s@a.test")
    return an_envelope("r@b.test", body=b"x", id="m1", sender_domain="a.test", **kw)


def test_delay_warning_goes_once_after_the_configured_age_and_never_by_default() -> None:
    now = 10_000.0
    warn = RetryConfig(delay_warning_after=3600.0)
    assert not wants_delay_warning(_env(received_at=now - 7200), RetryConfig(), now)
    assert not wants_delay_warning(_env(received_at=now - 60), warn, now)
    assert wants_delay_warning(_env(received_at=now - 7200), warn, now)
    assert not wants_delay_warning(_env(received_at=now - 7200, meta={DELAY_WARNED: "1"}), warn, now)
    assert not wants_delay_warning(_env(received_at=now - 7200, kind="dsn"), warn, now)
    assert not wants_delay_warning(_env(received_at=now - 7200, sender=""), warn, now)


def test_bounce_notice_carries_the_delay_warning_flag() -> None:
    notice = BounceNotice(
        _env(), (Bounced("r@b.test", Reply(451, "4.3.0", "later")),), releases_body=False, delay_warning=True
    )
    back = BounceNotice.from_msgpack(notice.to_msgpack())
    assert back.delay_warning and not back.releases_body and back.failures == notice.failures
    assert not BounceNotice.from_msgpack(BounceNotice(_env(), ()).to_msgpack()).delay_warning


def test_an_unhealthy_source_is_probed_again_and_used_once_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bind failure during an IP failover must not bench the address for good.
    health = SourceHealth()
    here, elsewhere = Source("127.0.0.1", "a.test"), Source("192.0.2.77", "b.test")
    health.mark_unhealthy(here.address, "bind failed on connect")
    health.mark_unhealthy(elsewhere.address, "not on this host")
    assert health.usable([(here, 1), (elsewhere, 1)]) == []
    monkeypatch.setattr(sources, "RECHECK_SECONDS", 0.0)
    assert health.usable([(here, 1), (elsewhere, 1)]) == [(here, 1)]


def test_a_reserved_slot_is_read_by_both_releases_during_an_upgrade() -> None:
    now = 1000.0
    meta = _Slot("127.0.0.21", "gmail", now, 5.0).meta()
    assert meta[SLOT_META] == "127.0.0.21|gmail|1000.000", "the previous release reads three fields"
    slot = _parse_slot(meta[SLOT_META], meta[SLOT_INTERVAL_META])
    assert slot.holds("127.0.0.21", "gmail", 5.0, now, base=5.0)
    assert not slot.holds("127.0.0.21", "gmail", 10.0, now, base=5.0), "void after a push-back"
    # Written by the previous release: no interval, taken as the site's own rate.
    old = _parse_slot("127.0.0.21|gmail|1000.000", "")
    assert old.holds("127.0.0.21", "gmail", 5.0, now, base=5.0)
    assert not old.holds("127.0.0.21", "gmail", 10.0, now, base=5.0)
