"""Connection reuse per (source IP, MX address), within the shaping limits of (source, site).

A connection is checked out for one transaction and checked back in afterwards; it waits idle
for the next message to the same MX address from the same source (under any MX name of the
site that points there, `ConnectionPool._fits`), until it reached the site's
`messages_per_connection` or `REUSE_TIME_LIMIT` of age, or sat idle for `delivery.idle_timeout`.
It is RSET before reuse only when a transaction may still be open or it sat idle for a while
(`Connection.needs_probe`); otherwise the next MAIL goes straight out, and a connection the
server closed meanwhile is replaced (sending.py). Opening a connection takes a cluster-wide
lease (the site's `connections` cap) and a new-connection rate slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from services.delivery.limits import LEASE_RENEW_BEFORE, LEASE_TTL, Lease, SharedLimits, lease_key
from services.delivery.shaping import Limits
from services.delivery.smtp_session import (
    Connection,
    SessionSettings,
    Source,
    open_connection,
    without_starttls,
)
from services.delivery.tls_policy import TlsPolicy

log = logging.getLogger(__name__)

_LEASE_POLL = 0.2
_K = TypeVar("_K")
# Postfix's smtp_connection_reuse_time_limit: a connection is not reused once it is this old,
# however busy. Without it a site with no message budget (messages_per_connection = 0) keeps a
# busy connection for as long as mail flows, with the server's view of it (its decisions at
# connect, its per-session counters) and its TLS session as old as the connection.
REUSE_TIME_LIMIT = 300.0
# How long an MX whose STARTTLS handshake failed gets plaintext straight away (Postfix retries
# plaintext at once too, but each time pays the failed handshake first).
_TLS_BROKEN_SECONDS = 600.0


def _spent(conn: Connection, limits: Limits) -> bool:
    """Whether `conn` has had its share: the site's message budget, or the reuse time limit."""
    budget = limits.messages_per_connection
    return (budget > 0 and conn.sent >= budget) or time.monotonic() - conn.opened_at >= REUSE_TIME_LIMIT


class Saturated(Exception):
    """Every connection (source, site) may have is busy, here or on other workers: try later."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"connection limit reached; retry in {retry_after:.0f}s")
        self.retry_after = retry_after


class _KeyedLocks(Generic[_K]):
    """One lock per key, kept only while a task holds or waits for it. The keys are (source,
    site) pairs, and a worker meets one for each source it picks and destination it sends to:
    kept for ever, a lock per pair would grow with every new one for the worker's lifetime."""

    def __init__(self) -> None:
        self._locks: dict[_K, tuple[asyncio.Lock, int]] = {}  # the lock, and its holder and waiters

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def held(self, key: _K) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users > 1:
                self._locks[key] = (lock, users - 1)
            else:
                del self._locks[key]  # no one waits for it: the next user makes a new one


class ConnectionPool:
    def __init__(
        self,
        limits: SharedLimits,
        settings: SessionSettings,
        *,
        idle_timeout: float = 10.0,
        lease_wait: float = 5.0,
    ) -> None:
        self._limits = limits
        self._settings = settings
        self._idle_timeout = idle_timeout
        self._lease_wait = lease_wait
        # By source (address and EHLO name: one IP may serve two pools under two names) and MX.
        self._idle: dict[tuple[Source, str], list[Connection]] = defaultdict(list)
        self._site_of: dict[int, tuple[str, str]] = {}
        # (source address, MX address) whose STARTTLS failed: opportunistic TLS is skipped until then.
        self._tls_broken: dict[tuple[str, str], float] = {}
        self._leases: dict[int, Lease] = {}
        # Leases granted to connections being opened (by id of the lease): renewed like the
        # others, since a tarpit greeting can take longer than LEASE_TTL.
        self._opening: dict[int, Lease] = {}
        self._lease_locks: _KeyedLocks[tuple[str, str]] = _KeyedLocks()
        # By lease key: a grant states how many leases this worker holds, and a release takes one
        # off the stored count. A release must not land after a grant that already left its lease
        # out, or the record counts one connection fewer than are open, and others exceed the cap.
        self._lease_writes: _KeyedLocks[str] = _KeyedLocks()
        self._lease_miss: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        # Wakes local waiters at the connection cap as soon as a connection comes back idle.
        self._returned = asyncio.Condition()
        self.opened = 0  # connections opened, for benchmarks and metrics

    def start(self) -> None:
        self._task = asyncio.create_task(self._housekeeping())

    async def checkout(
        self,
        source: Source,
        site: str,
        host: str,
        address: str,
        limits: Limits,
        policy: TlsPolicy,
        *,
        fresh: bool = False,
    ) -> Connection:
        """A connection to `address` from `source`: an idle one when fit, else a new one; a new
        one always when `fresh` (idle ones to `address` were found dead, and any left may be).

        At the site's connection cap this waits (up to `lease_wait`) for a connection to come
        back idle, or for a lease to free up anywhere in the cluster; then gives up: Saturated.
        """
        deadline = time.monotonic() + self._lease_wait

        def keep(conn: Connection) -> bool:  # idle connections this job may still reuse
            return not fresh and conn.address == address and self._fits(conn, site, host, policy)

        while True:
            conn = None if fresh else await self._reuse(source, site, host, address, limits, policy)
            if conn is not None:
                return conn
            if limits.connections <= 0:
                return await self._open(source, site, host, address, limits, policy, None)
            # One task per (source, site) talks to KV at a time; the others wait for its
            # result or for a connection coming back idle, instead of all scanning leases.
            async with self._lease_locks.held((source.address, site)):
                conn = None if fresh else await self._reuse(source, site, host, address, limits, policy)
                if conn is not None:
                    return conn
                key = (source.address, site)
                lease = None
                # All held a moment ago (another task looked): do not ask KV again so soon.
                if time.monotonic() - self._lease_miss.get(key, 0.0) >= _LEASE_POLL:
                    async with self._lease_writes.held(lease_key(source.address, site)):
                        lease = await self._limits.acquire_lease(
                            source.address, site, limits.connections, self._held(source.address, site)
                        )
                    if lease is None:
                        self._lease_miss[key] = time.monotonic()
                    else:
                        self._opening[id(lease)] = lease  # held from now on, registered once open
            if lease is not None:
                return await self._open(source, site, host, address, limits, policy, lease)
            # Our own idle connections of the site that this job cannot use hold leases we can
            # free (any of them when those to this address are not to be reused).
            if await self._close_one_idle(source.address, site, keep):
                continue
            if time.monotonic() >= deadline:
                raise Saturated(max(self._lease_wait, 5.0))
            # Woken by a local check-in; the timeout catches leases freed by other workers.
            async with self._returned:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._returned.wait(), _LEASE_POLL)

    def _held(self, source: str, site: str) -> int:
        """Leases this worker holds on (source, site): its open connections' and those granted
        to connections still opening."""
        key = lease_key(source, site)
        return sum(1 for lease in self._held_leases() if lease.key == key)

    def _held_leases(self) -> list[Lease]:
        return [*self._leases.values(), *self._opening.values()]

    def _fits(self, conn: Connection, site: str, host: str, policy: TlsPolicy) -> bool:
        """Whether `conn` (to the job's address) may carry a job to `host` of `site` under
        `policy`. Several MX names often share an address (every Microsoft 365 tenant's
        <tenant>.mail.protection.outlook.com): a connection serves any of them, as Postfix
        reuses a cached session by address and TLS level, except one whose certificate was
        checked, which serves its own name only. Within the site only: its lease is the
        site's, and another site's cap must not carry this one's mail."""
        if not conn.satisfies(policy):
            return False
        if conn.host == host:
            return True
        return not conn.verified and self._site_of.get(id(conn)) == (conn.source.address, site)

    async def _reuse(
        self, source: Source, site: str, host: str, address: str, limits: Limits, policy: TlsPolicy
    ) -> Connection | None:
        """The most recently used idle connection to `address` fit for this job, probed when
        it needs it. One that does not fit stays idle for the jobs it does fit."""
        idle = self._idle.get((source, address), [])
        while True:
            conn = next((c for c in reversed(idle) if self._fits(c, site, host, policy)), None)
            if conn is None:
                return None
            idle.remove(conn)
            probe = conn.needs_probe(time.monotonic())
            if conn.alive and not _spent(conn, limits) and (not probe or await conn.reset()):
                # Not probed: its first command may find it closed (StaleConnection, sending.py).
                conn.unprobed = conn.sent > 0 and not probe
                conn.host = host  # the name this job reached it by: its outcomes and logs say so
                return conn
            log.debug("idle connection to %s[%s] not reusable (sent %d)", conn.host, conn.address, conn.sent)
            await self._discard(conn)

    async def _open(
        self,
        source: Source,
        site: str,
        host: str,
        address: str,
        limits: Limits,
        policy: TlsPolicy,
        lease: Lease | None,
    ) -> Connection:
        async def pace() -> None:
            interval = limits.connection_interval()
            if interval > 0:
                slot = await self._limits.reserve(
                    "conn", source.address, site, interval, latest=time.time() + self._lease_wait
                )
                wait = slot - time.time()
                if wait > self._lease_wait:
                    raise Saturated(wait)
                if wait > 0:
                    await asyncio.sleep(wait)

        tls_broken = (source.address, address)

        async def after_failed_starttls() -> None:
            # The plaintext retry is a second connection, so it takes a second slot. If that
            # is too far off (Saturated), the next attempt goes plaintext at once, on one slot:
            # else a slow connection rate would give every attempt a STARTTLS failure and no mail.
            self._tls_broken[tls_broken] = time.monotonic() + _TLS_BROKEN_SECONDS
            await pace()

        try:
            await pace()
            settings = self._settings
            opportunistic = not (policy.require or policy.verify)
            if opportunistic and self._tls_broken.get(tls_broken, 0.0) > time.monotonic():
                settings = without_starttls(settings)  # it failed a moment ago: plaintext at once
            conn = await open_connection(
                address, host, source, settings, policy, reconnect=after_failed_starttls
            )
        except BaseException:
            if lease is not None:
                await self._release(self._opening, id(lease), lease.key)
            raise
        self.opened += 1
        log.debug("opened connection %s -> %s[%s] for site %s", source.address, host, address, site)
        self._site_of[id(conn)] = (source.address, site)
        if lease is not None:
            self._opening.pop(id(lease), None)
            self._leases[id(conn)] = lease
        return conn

    async def checkin(self, conn: Connection, limits: Limits, *, reusable: bool) -> None:
        if not reusable or _spent(conn, limits) or not conn.alive:
            log.debug("closing connection to %s[%s] after %d message(s)", conn.host, conn.address, conn.sent)
            await self._discard(conn)
            return
        conn.last_used = time.monotonic()
        self._idle[(conn.source, conn.address)].append(conn)
        async with self._returned:
            self._returned.notify(1)

    async def _close_one_idle(self, source: str, site: str, keep: Callable[[Connection], bool]) -> bool:
        for conns in self._idle.values():
            for conn in conns:
                if self._site_of.get(id(conn)) == (source, site) and not keep(conn):
                    conns.remove(conn)
                    await self._discard(conn)
                    return True
        return False

    async def _discard(self, conn: Connection) -> None:
        await conn.close()
        self._site_of.pop(id(conn), None)
        lease = self._leases.get(id(conn))
        if lease is not None:
            await self._release(self._leases, id(conn), lease.key)
        async with self._returned:
            self._returned.notify(1)

    async def _release(self, held: dict[int, Lease], ident: int, key: str) -> None:
        """Stop counting the lease `held[ident]` here and take it off KV's count, with no grant in
        between (`_lease_writes`)."""
        async with self._lease_writes.held(key):
            lease = held.pop(ident, None)
            if lease is not None:
                await self._limits.release(lease)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._idle_timeout / 2))
            try:
                await self._sweep()
            except Exception as exc:  # NATS away while renewing: try again next round
                log.warning("connection housekeeping failed: %r", exc)

    async def _sweep(self) -> None:
        # Leases first: closing a stale connection may wait for its QUIT, and a few hung ones
        # must not hold the renewal back until the leases lapse.
        await self._renew_leases()
        now = time.monotonic()
        for key in [k for k, until in self._tls_broken.items() if until <= now]:
            del self._tls_broken[key]
        for miss in [k for k, at in self._lease_miss.items() if now - at >= _LEASE_POLL]:
            del self._lease_miss[miss]  # past its use, like the locks (_KeyedLocks)
        stale: list[Connection] = []
        for key, conns in list(self._idle.items()):
            for conn in [c for c in conns if now - c.last_used > self._idle_timeout or not c.alive]:
                conns.remove(conn)
                stale.append(conn)
            if not conns:
                self._idle.pop(key, None)
        # Together: each close may wait for its QUIT (5 s), and a few silent peers closed one
        # after another would hold the next renewal back until every lease here had lapsed.
        await asyncio.gather(*(self._discard(conn) for conn in stale))

    async def _renew_leases(self) -> None:
        leases = self._held_leases()
        due = {lease.key for lease in leases if lease.until - time.time() < LEASE_RENEW_BEFORE}
        for key in due:
            async with self._lease_writes.held(key):  # a lapsed entry is restated with this count
                leases = self._held_leases()
                await self._limits.renew(key, Counter(lease.key for lease in leases)[key])
            for lease in leases:
                if lease.key == key:
                    lease.until = time.time() + LEASE_TTL

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        # Together, as in _sweep: each close may wait for its QUIT (5 s), and a stopping worker
        # closing a few silent peers one after another could outlast its grace period.
        await asyncio.gather(*(self._discard(conn) for conn in idle))
