"""Reading pause records never fails: delivery holds mail for any value under a pause key, so the
operator's listing must show each one, whatever release wrote it."""

from __future__ import annotations

import json

from services.core.pause import Pause, decode_pause, parse_pause_key, pause_key


def test_a_record_is_named_by_its_key_and_keeps_what_it_says() -> None:
    record = {"kind": "site", "name": "other", "reason": "incident 7", "at": 5, "by": "ann", "ttl": 60}
    assert decode_pause(pause_key("source", "2001:db8::1"), json.dumps(record).encode()) == Pause(
        "source", "2001:db8::1", "incident 7", 5.0, "ann"
    )


def test_a_kind_from_a_newer_release_or_a_mistyped_record_is_still_listed() -> None:
    assert decode_pause("pause.tenant.big", b'{"reason": "abuse"}') == Pause("tenant", "big", "abuse")
    for value in (b'{"at": "yesterday"}', b"null", b"\xff", b"42"):
        assert decode_pause("pause.pool.bulk", value) == Pause("pool", "bulk", "unreadable pause record")


def test_a_source_is_paused_under_one_key_however_its_address_is_spelt() -> None:
    # The operator's spelling and the pool's must meet: a pause under another spelling paused
    # nothing, and the command said it had.
    key = pause_key("source", "2001:db8::1")
    assert pause_key("source", "2001:DB8:0::1") == key
    assert pause_key("source", "2001:0db8:0000:0000:0000:0000:0000:0001") == key
    assert pause_key("source", "127.0.0.5") == pause_key("source", " 127.0.0.5 ")


def test_a_site_is_paused_under_its_a_label_name_however_it_is_written() -> None:
    # The router stores sites in A-labels (domain_key): `relais pause site bücher.test` was
    # refused, and an operator had to know to write xn--bcher-kva.test.
    key = pause_key("site", "xn--bcher-kva.test")
    assert key == "pause.site.xn--bcher-kva.test"
    for spelling in ("bücher.test", "BÜCHER.Test.", " Bücher.test "):
        assert pause_key("site", spelling) == key
    assert parse_pause_key(key) == ("site", "xn--bcher-kva.test")
