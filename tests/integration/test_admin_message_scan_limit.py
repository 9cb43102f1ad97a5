"""`relais message` reads the events stream from the message's arrival on, up to a limit of
events (a million: about an hour of a busy cluster's events). A message whose later events lie
beyond the limit, such as the delivery after a retry hours later, must not be reported as
"still queued": the history says it was cut short instead."""

from __future__ import annotations

from services.admin.history import message_events, render_history
from services.core.bus import Bus
from services.core.events import Event
from services.core.topology import event_subject
from tests.support.relais import an_envelope


async def record(bus: Bus, event: Event) -> None:
    await bus.publish(event_subject(event.account, event.kind), event.to_json())


async def test_a_history_cut_short_by_the_scan_limit_does_not_say_still_queued(topology_bus: Bus) -> None:
    env = an_envelope("r@alpha.test")
    other = an_envelope("o@beta.test")
    await record(topology_bus, Event("accepted", env.id, env.account, ["r@alpha.test"]))
    for _ in range(30):  # the cluster's other mail, between this message's events
        await record(topology_bus, Event("accepted", other.id, other.account, ["o@beta.test"]))
    await record(topology_bus, Event("delivered", env.id, env.account, ["r@alpha.test"], attempt=2))

    events = await message_events(topology_bus.js, env.id, limit=10)
    text = render_history(env.id, events)
    assert [e.kind for e in events] == ["accepted"]
    assert "still queued" not in text, text
    assert "final:" not in text, text
    assert "not read" in text.splitlines()[-1], text

    # Read to the end, the same history is complete.
    events = await message_events(topology_bus.js, env.id)
    assert render_history(env.id, events).splitlines()[-1] == "final: delivered"
