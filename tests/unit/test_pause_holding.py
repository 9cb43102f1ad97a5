"""Which jobs a set of pauses holds, as `relais status` counts them: a delivery worker postpones a
job whose pool, or whose site as the router named it, is paused; a source's pause holds no job by
itself (the pool's other sources send it)."""

from __future__ import annotations

from services.core.pause import Pause, holding


def test_a_job_is_held_by_a_pause_of_its_pool_or_of_its_site() -> None:
    paused = [Pause("pool", "bulk"), Pause("site", "xn--bcher-kva.test"), Pause("source", "192.0.2.1")]
    holds = holding(paused)
    assert holds("bulk", "alpha.test")
    assert holds("default", "xn--bcher-kva.test")
    assert not holds("default", "alpha.test")
    assert not holds("default", "192.0.2.1"), "a source's pause is not a site's"


def test_pools_and_sites_are_matched_as_their_pause_keys_spell_them() -> None:
    holds = holding([Pause("pool", "bulk"), Pause("site", "alpha.test")])
    assert holds("Bulk", "")
    assert holds("default", "Alpha.Test.")
    assert holds("default", "alpha.test")


def test_nothing_is_held_without_pauses_nor_by_names_no_job_can_have() -> None:
    assert not holding([])("default", "alpha.test")
    # A kind a newer release added is listed by status, but this release's workers hold nothing for it.
    holds = holding([Pause("region", "eu"), Pause("pool", "bulk")])
    assert not holds("", "")
    assert not holds("a*", "a b")
