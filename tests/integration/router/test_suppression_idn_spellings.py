"""One mailbox, one suppression entry, however its domain is spelt: a hard bounce recorded for
bob@bücher.test suppresses mail to bob@xn--bcher-kva.test, as the ingress and the router take
both for one recipient. Entries an earlier release wrote under the spelling it was given are
still found, for either spelling, and removed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from services.core.bus import Bus
from services.core.suppression import Suppression, SuppressionList
from services.core.topology import SUPPRESSION_BUCKET
from services.router.plan import Job, without_suppressed

U_LABEL = "bob@bücher.test"
A_LABEL = "bob@xn--bcher-kva.test"


async def _lookups(bus: Bus, address: str) -> tuple[bool, bool]:
    """Whether `address` is suppressed: by the router's batched lookup, and by a single get."""
    batched = await SuppressionList(bus.js, bus).get_many("acme", [address])
    single = await SuppressionList(bus.js).get("acme", address)
    return address.lower() in batched, single is not None


async def test_an_entry_for_one_spelling_suppresses_the_other(topology_bus: Bus) -> None:
    suppression = SuppressionList(topology_bus.js)
    await suppression.add(Suppression("acme", U_LABEL, "hard_bounce"), keep_longer=True)
    assert await _lookups(topology_bus, A_LABEL) == (True, True)
    assert await _lookups(topology_bus, "Bob@Bücher.test.") == (True, True)
    assert await suppression.remove("acme", A_LABEL)
    assert await _lookups(topology_bus, U_LABEL) == (False, False)


async def test_an_entry_an_earlier_release_wrote_is_found_and_removed(topology_bus: Bus) -> None:
    # Written as earlier releases did: the address hashed as given, U-labels and all.
    kv = await topology_bus.js.key_value(SUPPRESSION_BUCKET)
    legacy = f"acme.{hashlib.sha256(U_LABEL.encode()).hexdigest()[:40]}"
    await kv.put(legacy, json.dumps(asdict(Suppression("acme", U_LABEL, "complaint", at=1.0))).encode())

    assert await _lookups(topology_bus, U_LABEL) == (True, True)
    assert await _lookups(topology_bus, A_LABEL) == (True, True)
    assert await SuppressionList(topology_bus.js).remove("acme", A_LABEL)
    assert await _lookups(topology_bus, U_LABEL) == (False, False)


async def test_two_spellings_of_one_mailbox_in_one_message_are_both_suppressed(topology_bus: Bus) -> None:
    # "Bob@Bücher.test" and "bob@xn--bcher-kva.test" are two recipients to the ingress (the local
    # part's case may matter), one mailbox to the suppression list: the batched lookup shares
    # its keys between them, and must still answer for each, as one get each does.
    await SuppressionList(topology_bus.js).add(Suppression("acme", U_LABEL, "hard_bounce"), keep_longer=True)
    recipients = ("Bob@Bücher.test", A_LABEL)

    found = await SuppressionList(topology_bus.js, topology_bus).get_many("acme", recipients)

    single = SuppressionList(topology_bus.js)
    assert {a.lower() for a in recipients if await single.get("acme", a) is not None} == set(found)
    kept, dropped = without_suppressed(Job("m1-0", "xn--bcher-kva.test", recipients), found)
    assert kept.recipients == () and dropped == recipients
