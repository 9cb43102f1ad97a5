"""Pause and resume delivery of a pool, a source IP or a destination site, for every replica.

The flags live in the `relais-delivery-control` KV bucket (format owned by
`services.core.pause`, which the admin CLI also uses). Every delivery worker watches that bucket
(`services.delivery.control`), so a pause takes effect everywhere within a moment and survives
restarts. Paused mail is not held by a consumer: the worker re-schedules it
`delivery.pause_recheck` seconds later through a JetStream message schedule, without counting an
attempt, so nothing is lost and no ack-pending window fills up however long the pause lasts.

    from services.delivery import pause
    await pause.pause(js, "site", "google", reason="incident 42")
    await pause.is_paused(js, "site", "google")      # -> True
    await pause.list_paused(js)                      # -> [Pause("site", "google", ...)]
    await pause.resume(js, "site", "google")         # -> True if it was paused
"""

from __future__ import annotations

from nats.js import JetStreamContext

from services.core.pause import PAUSE_KINDS, Pause, PauseError, PauseState, pause_key

__all__ = ["PAUSE_KINDS", "Pause", "PauseError", "is_paused", "list_paused", "pause", "pause_key", "resume"]


async def pause(js: JetStreamContext, kind: str, name: str, *, reason: str = "", by: str = "") -> Pause:
    """Stop delivery for a pool, a source IP or a site until `resume`. Idempotent."""
    return await PauseState(js).pause(kind, name, reason=reason, by=by)


async def resume(js: JetStreamContext, kind: str, name: str) -> bool:
    """Let delivery go on; False when it was not paused. Waiting mail goes at its next recheck."""
    return await PauseState(js).resume(kind, name)


async def is_paused(js: JetStreamContext, kind: str, name: str) -> bool:
    return await PauseState(js).is_paused(kind, name)


async def list_paused(js: JetStreamContext) -> list[Pause]:
    return await PauseState(js).paused()
