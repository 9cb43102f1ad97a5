"""Pause state: which pools, sources and sites must not send now, shared through NATS KV.

Written by the admin CLI (`relais pause|resume`), read by every delivery worker. It lives in
core because two services' code (admin and delivery) must agree on it, and services never
import each other's internals. Keys sit in the delivery control bucket declared in topology:

    pause.<kind>.<name>     kind in pool | source | site; value: JSON {kind, name, reason, at, by}

Names are pool names, source IPs or site names, in A-labels as the router names sites: a
`[sites]` rule's name, else the registrable part of the destination's primary MX host
("example.co.uk" for mx1.mail.example.co.uk), never an MX host itself. ':' of IPv6 addresses,
which KV keys cannot hold, is written as '_', so every key is a valid KV key and maps back to one
name.

A pool must be one of the cluster (it has a delivery consumer), a source an IP address, a site a
name the router or delivery's shaping rules can give: a pause under another name would hold
nothing, yet be listed by `relais status` as if it held the mail. Resuming one stays allowed, so
that such a record can be cleared. Which sites exist is not checked: the router names them from
DNS as mail comes, and a site with no mail yet may be paused ahead of it.

A pause carries no TTL: it stays until resumed. A resume purges its key with a marker that
expires in turn (`purge_marker`), so a resumed pause leaves nothing behind.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.api import Header, RawStreamMsg
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT

from services.core.addresses import domain_key, ip_key
from services.core.bus import WRONG_LAST_SEQUENCE, is_kv_delete, leader_last
from services.core.config import ConfigError
from services.core.kv_watch import stored
from services.core.sites import site_of_host
from services.core.topology import (
    DELIVER_STREAM,
    DELIVERY_CONTROL_BUCKET,
    DELIVERY_CONTROL_MARKER_TTL,
    SubjectError,
    delivery_consumer,
    delivery_pools,
    kv_stream,
    kv_subject,
)

PAUSE_KINDS = ("pool", "source", "site")
_KEY_PREFIX = "pause"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")

log = logging.getLogger(__name__)


class PauseError(ValueError):
    """Not a pausable thing (unknown kind, or a name that cannot be a key)."""


class UnknownPool(PauseError):
    """A pool the cluster does not have: no job is of it, so its pause would hold nothing."""


class NotASite(PauseError):
    """A dotted name no site has (an MX host): delivery looks pauses up by the job's site, so its
    pause would hold nothing."""


class PausedAgain(PauseError):
    """Paused anew while a resume was clearing the pause it had read: the new pause stands."""


@dataclass(frozen=True, slots=True)
class Pause:
    kind: str
    name: str
    reason: str = ""
    at: float = 0.0
    by: str = ""


def pause_name(kind: str, name: str) -> str:
    """A name in the one spelling its pause key holds, the spelling delivery looks it up by."""
    name = name.strip().lower().rstrip(".")
    if kind == "source":
        # `relais pause source 2001:db8:0::1` must pause the pool's 2001:db8::1.
        return ip_key(name)
    if kind == "site":
        # The router names sites in A-labels: `relais pause site bücher.test` must pause
        # xn--bcher-kva.test. Pools are names of the configuration, not domains.
        return domain_key(name)
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def pause_key(kind: str, name: str) -> str:
    if kind not in PAUSE_KINDS:
        raise PauseError(f"cannot pause a {kind!r}; use one of {', '.join(PAUSE_KINDS)}")
    name = pause_name(kind, name)
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


def _kind_and_name(key: str) -> tuple[str, str]:
    try:
        return parse_pause_key(key)
    except PauseError:
        # A kind a newer release added: shown as its key spells it.
        kind, _, name = key.partition(".")[2].partition(".")
        return kind, name


def decode_pause(key: str, value: bytes) -> Pause:
    """The pause a record under `key` stands for. Never raises: delivery holds mail for any value
    under a pause key, so `relais status` must show every such record, whatever it holds."""
    kind, name = _kind_and_name(key)  # the key, not the record, is what delivery goes by
    try:
        record = json.loads(value)
        # Fields a newer release added are ignored, so a rolling upgrade reads its records.
        return Pause(
            kind,
            name,
            reason=str(record.get("reason", "")),
            at=float(record.get("at", 0.0)),
            by=str(record.get("by", "")),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        log.error("unreadable pause record %s %r: %s", key, value[:200], exc)
        return Pause(kind, name, reason="unreadable pause record")


def ttl_header(seconds: float) -> str:
    """A `Nats-TTL` value no shorter than `seconds`: the header counts whole seconds, and a
    record removed before its back-off ends would lift it early."""
    return str(max(1, math.ceil(seconds)))


def purge_marker(revision: int) -> dict[str, str]:
    """The headers of a purge marker for a key of the delivery control bucket (a resumed pause, an
    ended back-off), as KV's purge writes it, stored only if the key is still at `revision`: the
    purge(key, revision) of the other NATS clients. It removes the key's value, and goes itself
    after `DELIVERY_CONTROL_MARKER_TTL`: every watching worker has seen it by then, and one whose
    watch was away longer reads the bucket anew. Without the TTL, every key ever resumed or
    purged stayed in the bucket, and in the replay each starting worker reads."""
    return {
        KV_OP: KV_PURGE,
        Header.ROLLUP.value: MSG_ROLLUP_SUBJECT,
        Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision),
        # Read at each call: tests shorten it.
        Header.MSG_TTL.value: ttl_header(DELIVERY_CONTROL_MARKER_TTL),
    }


class PauseState:
    """Read and write pause flags. Every call is a KV operation or two; callers cache if they must."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv = None

    async def _bucket(self):  # type: ignore[no-untyped-def]
        if self._kv is None:
            self._kv = await self._js.key_value(DELIVERY_CONTROL_BUCKET)
        return self._kv

    async def pause(
        self,
        kind: str,
        name: str,
        *,
        reason: str = "",
        by: str = "",
        shaping_sites: Callable[[], Collection[str]] = tuple,
    ) -> Pause:
        """Store a pause. `shaping_sites` gives the site names delivery's shaping rules claim
        domains or MX hosts for (any name, dots and all), asked only for a dotted site name the
        router would never give: the admin host may lack the shaping file it is read from."""
        key = pause_key(kind, name)
        if kind == "source" and not _is_ip(pause_name(kind, name)):
            # Sources are IP addresses (the config takes no other), and delivery looks their
            # pauses up by address: this one would hold nothing, and be listed as if it did.
            # Only setting one is refused: a pause stored under such a name can still be resumed.
            raise PauseError(f"{name.strip()!r} is no IP address: a source is paused by its address")
        if kind == "pool":
            await self._check_pool(pause_name(kind, name))
        if kind == "site":
            _check_site(pause_name(kind, name), shaping_sites)
        entry = Pause(kind, pause_name(kind, name), reason, time.time(), by)
        await (await self._bucket()).put(key, json.dumps(asdict(entry)).encode())
        return entry

    async def _check_pool(self, name: str) -> None:
        """Raise UnknownPool unless the cluster has the pool (`name` as its pause key spells it,
        in lower case, as delivery looks pauses up): a typo in an incident paused nothing."""
        try:
            await self._js.consumer_info(DELIVER_STREAM, delivery_consumer(name))
            return
        except (NotFoundError, SubjectError):
            pass  # or its consumer is spelled in another case: look at them all
        pools = await delivery_pools(self._js)
        if name not in {pause_name("pool", pool) for pool in pools}:
            raise UnknownPool(f"no pool {name!r} in this cluster; its pools: {', '.join(pools) or 'none'}")

    async def resume(self, kind: str, name: str) -> bool:
        """Clear a pause; False when it was not paused. Raises PausedAgain when someone paused it
        again between this read and the purge: a purge of whatever is there would lose that one."""
        key = pause_key(kind, name)
        read = await self._stored(key)
        if read is None:
            return False
        # A purge marker at the revision read, not a stream purge up to that sequence: the
        # delivery workers watch the bucket, and would never see the pause end.
        try:
            marker = purge_marker(read.seq)
            await self._js.publish(kv_subject(DELIVERY_CONTROL_BUCKET, key), b"", headers=marker)
            return True
        except APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
        now = await self._stored(key)
        if now is None:
            return False  # resumed by someone else meanwhile
        again = decode_pause(key, now.data or b"")
        raise PausedAgain(
            f"{kind} {again.name} was paused again while resuming ({again.reason or 'no reason'},"
            f" by {again.by or 'unknown'}); it stays paused: resume it again to clear that pause"
        )

    async def _stored(self, key: str) -> RawStreamMsg | None:
        """The key's record, None when it has none. From the leader: a replica behind would give
        an old revision, and the compare-and-set on it would fail."""
        stream, subject = kv_stream(DELIVERY_CONTROL_BUCKET), kv_subject(DELIVERY_CONTROL_BUCKET, key)
        msg = await leader_last(self._js, stream, subject)
        return None if msg is None or is_kv_delete(msg) or not msg.data else msg

    async def is_paused(self, kind: str, name: str) -> bool:
        try:
            await (await self._bucket()).get(pause_key(kind, name))
        except (KeyNotFoundError, PauseError):
            return False
        return True

    async def paused(self) -> list[Pause]:
        """Everything paused now, sorted by kind and name; records this release cannot read too,
        since delivery holds mail for them all the same."""
        try:
            entries = await stored(self._js, DELIVERY_CONTROL_BUCKET, f"{_KEY_PREFIX}.>")
        except BucketNotFoundError:
            return []
        found = [decode_pause(entry.key, entry.value) for entry in entries]
        return sorted(found, key=lambda p: (p.kind, p.name))


def _check_site(name: str, shaping_sites: Callable[[], Collection[str]]) -> None:
    """Raise NotASite when `name` (as its pause key spells it) is an MX host rather than a site:
    `relais pause site mx.example.test` was stored and listed, and held nothing."""
    site = site_of_host(name)
    if site is None:
        return
    try:
        if name in {pause_name("site", s) for s in shaping_sites()}:
            return  # a shaping rule's own site: delivery holds its jobs by that name too
        unread = ""
    except ConfigError as exc:
        unread = f"; the shaping rules, which may name a site so, could not be read: {exc}"
    raise NotASite(
        f"{name} is no site name: mail to it is in site {site} (sites are named by the registrable"
        f" part of the primary MX host, or by a [sites] rule; a site named by a shaping rule is"
        f" known with --config naming its delivery.shaping_file){unread}"
    )


def holding(paused: Iterable[Pause]) -> Callable[[str, str], bool]:
    """Whether these pauses hold a job of `pool` for `site` (as the router named it): what a
    delivery worker checks before each attempt, postponing the job while either is paused.
    A source's pause holds no job by itself (the pool's other sources send it), and a site
    that only delivery's shaping rules name is not known here."""
    keys: set[str] = set()
    for p in paused:
        try:
            keys.add(pause_key(p.kind, p.name))
        except PauseError:
            continue  # a kind a newer release added: not what this release's workers check

    @functools.cache
    def paused_key(kind: str, name: str) -> bool:
        try:
            return bool(name) and pause_key(kind, name) in keys
        except PauseError:
            return False

    def holds(pool: str, site: str) -> bool:
        return bool(keys) and (paused_key("pool", pool) or paused_key("site", site))

    return holds
