"""When a reserved slot carried in a job is still good: not when the job comes back long after
its schedule brought it (an outage, a backlog), but yes when it came back when due, however long
after the slot that was (it found every connection busy and was sent back for a few seconds)."""

from __future__ import annotations

from services.delivery.service import (
    CARRIED_SLOT_GRACE,
    SLOT_DUE_META,
    SLOT_INTERVAL_META,
    SLOT_META,
    _parse_slot,
    _Slot,
)

SOURCE, SITE, INTERVAL = "127.0.0.21", "gmail", 5.0


def holds(slot: _Slot, now: float) -> bool:
    return slot.holds(SOURCE, SITE, INTERVAL, now, base=INTERVAL)


def test_a_slot_is_void_once_the_job_is_back_long_after_it_was_due() -> None:
    slot = _Slot(SOURCE, SITE, 1000.0, INTERVAL, due=1000.0)
    assert holds(slot, 1000.0)
    assert holds(slot, 1000.0 + CARRIED_SLOT_GRACE), "a worker busy for a moment"
    assert not holds(slot, 1000.0 + CARRIED_SLOT_GRACE + 0.01)
    assert not holds(slot, 1300.0), "back after an outage: a burst with the others"
    assert not slot.ours(SOURCE, SITE, INTERVAL, 1300.0, base=INTERVAL), "no keeping its place either"


def test_lateness_counts_from_when_the_job_was_due_back() -> None:
    # Saturated at its slot, sent back for 5 s: its slot is 5 s old when it returns on time.
    meta = _Slot(SOURCE, SITE, 1000.2, INTERVAL, due=1006.0).meta()
    slot = _parse_slot(meta[SLOT_META], meta[SLOT_INTERVAL_META], meta[SLOT_DUE_META])
    assert slot.due == 1006.0
    assert holds(slot, 1006.5)
    assert not holds(slot, 1006.0 + CARRIED_SLOT_GRACE + 0.01)


def test_a_slot_carried_without_its_due_time_was_due_on_the_second_after_it() -> None:
    # Re-scheduled by the previous release: the schedule fired on the whole second after the slot.
    slot = _parse_slot(f"{SOURCE}|{SITE}|1000.300", f"{INTERVAL:.3f}")
    assert slot.due is None and SLOT_DUE_META not in slot.meta()
    assert holds(slot, 1001.0 + CARRIED_SLOT_GRACE)
    assert not holds(slot, 1001.0 + CARRIED_SLOT_GRACE + 0.01)


def test_no_slot_is_never_late() -> None:
    assert not _Slot().late(1e12)
