"""Pause state: which pools, sources and sites must not send now, shared through NATS KV.

Written by the admin CLI (`relais pause|resume`), read by every delivery worker. It lives in
core because two services' code (admin and delivery) must agree on it, and services never
import each other's internals. Keys sit in the delivery control bucket declared in topology:

    pause.<kind>.<name>     kind in pool | source | site; value: JSON {kind, name, reason, at, by}

Names are pool names, source IPs or site names (MX hosts); ':' of IPv6 addresses, which KV keys
cannot hold, is written as '_', so every key is a valid KV key and maps back to one name.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

from services.core.topology import DELIVERY_CONTROL_BUCKET

PAUSE_KINDS = ("pool", "source", "site")
_KEY_PREFIX = "pause"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class PauseError(ValueError):
    """Not a pausable thing (unknown kind, or a name that cannot be a key)."""


@dataclass(frozen=True, slots=True)
class Pause:
    kind: str
    name: str
    reason: str = ""
    at: float = 0.0
    by: str = ""


def pause_key(kind: str, name: str) -> str:
    if kind not in PAUSE_KINDS:
        raise PauseError(f"cannot pause a {kind!r}; use one of {', '.join(PAUSE_KINDS)}")
    name = name.strip().lower().rstrip(".")
    if not name or not _NAME.match(name) or ".." in name:
        raise PauseError(f"{name!r} is not a valid {kind} name")
    return f"{_KEY_PREFIX}.{kind}.{name.replace(':', '_')}"


def parse_pause_key(key: str) -> tuple[str, str]:
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != _KEY_PREFIX or parts[1] not in PAUSE_KINDS:
        raise PauseError(f"not a pause key: {key!r}")
    name = parts[2]
    # Only sources are IP addresses; a source name with '_' was an IPv6 address.
    return parts[1], name.replace("_", ":") if parts[1] == "source" else name


class PauseState:
    """Read and write pause flags. Every call is one KV operation; callers cache if they must."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv = None

    async def _bucket(self):  # type: ignore[no-untyped-def]
        if self._kv is None:
            self._kv = await self._js.key_value(DELIVERY_CONTROL_BUCKET)
        return self._kv

    async def pause(self, kind: str, name: str, *, reason: str = "", by: str = "") -> Pause:
        key = pause_key(kind, name)
        entry = Pause(kind, name.strip().lower().rstrip("."), reason, time.time(), by)
        await (await self._bucket()).put(key, json.dumps(asdict(entry)).encode())
        return entry

    async def resume(self, kind: str, name: str) -> bool:
        """Clear a pause; False when it was not paused."""
        key = pause_key(kind, name)
        kv = await self._bucket()
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return False
        await kv.purge(key)
        return True

    async def is_paused(self, kind: str, name: str) -> bool:
        try:
            await (await self._bucket()).get(pause_key(kind, name))
        except (KeyNotFoundError, PauseError):
            return False
        return True

    async def paused(self) -> list[Pause]:
        """Everything paused now, sorted by kind and name."""
        try:
            kv = await self._bucket()
            keys = await kv.keys()
        except (NoKeysError, BucketNotFoundError):
            return []
        found = []
        for key in keys:
            if not key.startswith(_KEY_PREFIX + "."):
                continue
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                found.append(Pause(**json.loads(entry.value)))
        return sorted(found, key=lambda p: (p.kind, p.name))
