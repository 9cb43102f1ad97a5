"""Limits that must hold across ingress replicas, and the one that need not.

- Messages per hour/day per account and AUTH failures per IP/user are JetStream counters
  (ADR-49, stream RELAIS_LIMITS): one atomic `Nats-Incr` publish per event, fixed windows
  (UTC hour, UTC day, `auth_lockout` seconds) encoded in the subject, old windows aged out.
- Concurrent sessions per account live in a KV bucket, one key per (account, replica), refreshed
  while the replica lives and ignored once stale, so a crashed replica's sessions free themselves.
- Connections per client IP are counted per replica, like Postfix's anvil: a load balancer
  spreads one IP's connections, and the limit exists to protect this process. So are
  connections per load balancer still waiting for their PROXY header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError

from services.core.bus import BrokerUnavailable, Bus, is_store_full
from services.core.config import AccountConfig, IngressConfig
from services.core.topology import LIMITS_STREAM, SESSIONS_BUCKET, SESSIONS_TTL, limit_subject
from services.ingress.replies import DAILY_LIMIT, HOURLY_LIMIT, Verdict
from services.ingress.session import unmapped

log = logging.getLogger(__name__)

_BROKER_ERRORS = (TimeoutError, nats.errors.Error, APIError, OSError)


def ip_token(ip: str) -> str:
    return ip.replace(".", "-").replace(":", "_") or "unknown"


# An IPv6 client's failed AUTHs count for its /64: the least a host or site is given (RFC 6177),
# so one guesser holds 2^64 addresses to rotate through. Dovecot's auth penalty counts per /48.
IPV6_AUTH_PREFIX = 64


def auth_source(ip: str) -> str:
    """What failed AUTHs from `ip` are counted under: an IPv4 address itself, an IPv6 address's
    /64 by its first address ("2001:db8:1:2::"), `ip` as given when it is no address."""
    try:
        address = unmapped(ipaddress.ip_address(ip))
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{IPV6_AUTH_PREFIX}", strict=False).network_address)


def user_token(username: str) -> str:
    # Usernames come from the network: hash them rather than trust them as subject tokens.
    return hashlib.sha256(username.strip().lower().encode("utf-8", "replace")).hexdigest()[:24]


class Counters:
    """Atomic counters on the RELAIS_LIMITS stream (ADR-49)."""

    def __init__(self, bus: Bus, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def add(self, subject: str, delta: int = 1) -> int:
        ack = await self._publish(subject, {"Nats-Incr": f"{delta:+d}"})
        return int(ack.val or 0)

    async def add_once(self, subject: str, delta: int, msg_id: str) -> int | None:
        """As `add`, but applied once per `msg_id` however often it is sent (within the stream's
        duplicate window), so a change whose ack was lost can be sent again. None when it had
        been applied already: JetStream then reports no value."""
        ack = await self._publish(subject, {"Nats-Incr": f"{delta:+d}", "Nats-Msg-Id": msg_id})
        return None if ack.duplicate else int(ack.val or 0)

    async def _publish(self, subject: str, headers: dict[str, str]) -> PubAck:
        try:
            return await self._bus.js.publish(subject, b"", timeout=self._timeout, headers=headers)
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"counter {subject}: {exc!r}", store_full=is_store_full(exc)) from exc

    async def values(self, subjects: Sequence[str]) -> list[int]:
        """The current value of each counter (0 when it has none), in one direct-get round trip."""
        found = await self._bus.get_last(LIMITS_STREAM, subjects)
        return [_counter_value(found.get(subject)) for subject in subjects]


def _counter_value(msg: Msg | None) -> int:
    if msg is None:
        return 0
    try:
        return int(json.loads(msg.data or b"{}").get("val", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


def windows(now: float) -> tuple[int, int]:
    """UTC hour and UTC day numbers: fixed windows, so every replica agrees on the key."""
    return int(now // 3600), int(now // 86400)


def rate_verdict(account: AccountConfig, per_hour: int, per_day: int) -> Verdict | None:
    """Counts include the message being checked."""
    if account.max_messages_per_hour and per_hour > account.max_messages_per_hour:
        return HOURLY_LIMIT
    if account.max_messages_per_day and per_day > account.max_messages_per_day:
        return DAILY_LIMIT
    return None


# A refund is sent this many times at most while JetStream does not acknowledge it; its msg id
# makes a repeat that reaches the stream a second time a no-op.
_REFUND_ATTEMPTS = 2


async def give_back(counters: Counters, subject: str, msg_id: str) -> int | None:
    """-1 on `subject`, once per `msg_id`: the msg id lets a refund whose ack was lost be sent
    again without giving back twice. The counter's value after it, None if unknown."""
    for attempt in range(1, _REFUND_ATTEMPTS + 1):
        try:
            return await counters.add_once(subject, -1, msg_id)
        except BrokerUnavailable as exc:
            if attempt == _REFUND_ATTEMPTS:
                log.warning("could not refund %s (%s): %s", subject, msg_id, exc)
    return None


@dataclass(slots=True)
class Take:
    """What one message or AUTH attempt (`key`) took of some counters: those whose increment
    JetStream acknowledged, given back at most once (`give_back_all`)."""

    key: str = ""
    counters: tuple[str, ...] = ()


async def take_each(counters: Counters, take: Take, subjects: Sequence[str]) -> list[int | BaseException]:
    """Add 1 to each counter; each one's value, or the error it met. Every answer is waited for,
    failed or not: an increment acknowledged after another failed would otherwise be neither
    known nor given back. `take` holds the acknowledged ones."""
    results = await asyncio.gather(*(counters.add(s) for s in subjects), return_exceptions=True)
    take.counters = tuple(s for s, r in zip(subjects, results, strict=True) if isinstance(r, int))
    return results


async def give_back_all(counters: Counters, take: Take) -> list[int | None]:
    """Give back what `take` holds, once however often this is called; the counters' values
    after it, None where unknown."""
    subjects, take.counters = take.counters, ()
    return list(await asyncio.gather(*(give_back(counters, s, f"refund.{take.key}.{s}") for s in subjects)))


@dataclass(slots=True, kw_only=True)
class RateTake(Take):
    """What one message (`key`: its id) took of its account's rate counters."""

    account: str
    at: float


class MessageRates:
    """Messages per hour/day per account: exact at end of DATA, cheap at MAIL.

    Each increment's ack carries the counter's value across all replicas; the last one seen is
    kept per account and window, so MAIL can refuse an account that is already at its limit
    without a round trip (and without the client sending the data first).
    """

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        # account -> (hour window, count, day window, count) as of this replica's last increment
        self._seen: dict[str, tuple[int, int, int, int]] = {}

    @staticmethod
    def _subjects(name: str, now: float) -> tuple[str, str]:
        hour, day = windows(now)
        return limit_subject("msg-hour", name, hour), limit_subject("msg-day", name, day)

    def check(self, name: str, account: AccountConfig, now: float | None = None) -> Verdict | None:
        """At MAIL: refuse early when the last count seen says the account is at its limit."""
        seen = self._seen.get(name)
        if seen is None:
            return None
        hour, day = windows(time.time() if now is None else now)
        per_hour = seen[1] if seen[0] == hour else 0
        per_day = seen[3] if seen[2] == day else 0
        return rate_verdict(account, per_hour + 1, per_day + 1)

    async def reserve(
        self, name: str, account: AccountConfig, message_id: str
    ) -> tuple[Verdict | None, RateTake]:
        """At end of DATA: count message `message_id`; over the limit it is refunded and refused.

        Raises BrokerUnavailable (451) when either counter could not be counted, having given
        back the other one's increment: a refused message costs nothing, however often the
        client retries through the error. Returns the verdict and what was taken, for `refund`.
        """
        take = RateTake(key=message_id, account=name, at=time.time())
        if not (account.max_messages_per_hour or account.max_messages_per_day):
            return None, take
        results = await take_each(self._counters, take, self._subjects(name, take.at))
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            # An increment that timed out may have been applied: it is not given back, as one
            # cannot tell. The message then counts once though refused, rather than never.
            await self.refund(take)
            raise failure
        per_hour, per_day = (r for r in results if isinstance(r, int))
        verdict = rate_verdict(account, per_hour, per_day)
        self._remember(name, take.at, per_hour - bool(verdict), per_day - bool(verdict))
        if verdict:
            await self.refund(take)
        return verdict, take

    def _remember(self, name: str, now: float, per_hour: int, per_day: int) -> None:
        if len(self._seen) > 100_000:
            self._seen.clear()
        hour, day = windows(now)
        self._seen[name] = (hour, per_hour, day, per_day)

    async def refund(self, take: RateTake) -> None:
        """The message was not queued after all (451, or over the limit): give back what it
        took, once however often this is called."""
        values = await give_back_all(self._counters, take)
        per_hour, per_day = values if len(values) == 2 else (None, None)
        if per_hour is not None and per_day is not None:
            # Else MAIL's early check would go on counting the refunded message until the window ends.
            self._remember(take.account, take.at, per_hour, per_day)


def known_client_token(ip: str, username: str, secret: str) -> str:
    """Who logged in from where, unreadable without the account's password hash.

    A plain hash of an IPv4 address is reversed by trying all 2^32 of them; keyed with the
    password hash (which every replica reads from the accounts bucket), it cannot be, and a new
    password forgets every address the old one was used from (the attacker's, after a leak)."""
    message = f"{username.strip().lower()}\0{ip}".encode("utf-8", "replace")
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]


class AuthThrottle:
    """Failed AUTH per client IP and per username, in fixed windows of `lockout` seconds.

    After `max_failures` in a window, further attempts from that IP or for that user are refused
    until the window ends, whichever replica they reach. The per-user lock stops guessing spread
    over many addresses, but would also lock the account's owner out whenever anyone guesses: so
    it spares an IP that logged in as that user during this or the previous UTC day (`known`).
    Those records live in the same stream as the counters and age out with it (two days).
    """

    def __init__(self, counters: Counters, max_failures: int, lockout: float) -> None:
        self._counters = counters
        self._max = max_failures
        self._lockout = max(lockout, 1.0)
        # Known-client records this replica wrote today: one write per (user, IP) a day, not one
        # per login. Only a shortcut: the records themselves are in JetStream.
        self._recorded: set[str] = set()

    def _subjects(self, ip: str, username: str) -> tuple[str, str]:
        window = int(time.time() // self._lockout)
        return (
            limit_subject("authfail-ip", ip_token(auth_source(ip)), window),
            limit_subject("authfail-user", user_token(username), window),
        )

    @staticmethod
    def _known_subjects(ip: str, username: str, secret: str, now: float) -> tuple[str, str]:
        """Today's and yesterday's known-client records of (IP, user). An IPv6 client is known by
        its /64, as its failures are counted: its temporary addresses change daily or sooner."""
        token = known_client_token(auth_source(ip), username, secret)
        day = windows(now)[1]
        return limit_subject("auth-known", token, day), limit_subject("auth-known", token, day - 1)

    async def locked(self, ip: str, username: str, secret: str = "") -> tuple[bool, bool]:
        """(locked, known): whether this attempt is refused, and whether `ip` logged in as
        `username` recently (`secret`, the account's password hash, keys that record; without one,
        or without an IP from a PROXY header that named none, no client is known)."""
        if self._max <= 0:
            return False, False
        ip_s, user_s = self._subjects(ip, username)
        known_s = self._known_subjects(ip, username, secret, time.time()) if secret and ip else ()
        try:
            by_ip, by_user, *known = await self._counters.values([ip_s, user_s, *known_s])
        except BrokerUnavailable as exc:
            # Fail open on the throttle only: the password check itself still runs.
            log.warning("auth throttle unavailable: %s", exc)
            return False, False
        is_known = any(value > 0 for value in known)
        return by_ip >= self._max or (by_user >= self._max and not is_known), is_known

    async def reserve(self, ip: str, username: str, known: bool = False) -> Take | None:
        """Count an attempt as failed before its password is checked; None when that makes it
        one too many. Counting only after the check would let every guess that arrives while
        the others are still being checked pass `locked`: as many guesses per window as an
        attacker can open connections. Returns what was taken, to `refund` if the password is
        right. A `known` client's attempts count against the user too, but only its IP's count
        stops it. A counter the broker could not count stops nothing (the password check still
        runs); the other one still does.
        """
        take = Take(secrets.token_hex(8))
        if self._max <= 0:
            return take
        subjects = self._subjects(ip, username)
        # A right password must not stay counted as a failed guess: take_each knows what to give back.
        results = await take_each(self._counters, take, subjects)
        for subject, result in zip(subjects, results, strict=True):
            if isinstance(result, BrokerUnavailable):
                log.warning("auth attempt not counted on %s: %s", subject, result)
            elif isinstance(result, BaseException):
                await self.refund(take)
                raise result
        by_ip, by_user = (r if isinstance(r, int) else 0 for r in results)
        return None if by_ip > self._max or (by_user > self._max and not known) else take

    async def remember(self, ip: str, username: str, secret: str) -> None:
        """`ip` logged in as `username`: the per-user lock spares it for a day or two."""
        if self._max <= 0 or not ip or not secret:
            return
        subject = self._known_subjects(ip, username, secret, time.time())[0]
        if subject in self._recorded:
            return
        try:
            await self._counters.add(subject)
        except BrokerUnavailable as exc:
            log.warning("known client not recorded: %s", exc)
            return
        if len(self._recorded) > 100_000:
            self._recorded.clear()
        self._recorded.add(subject)

    async def refund(self, take: Take) -> None:
        """A reserved attempt whose password was right: it was no failure. Gives back what it
        took, once however often this is called."""
        await give_back_all(self._counters, take)


class SessionRegistry:
    """Open sessions per account across replicas (KV bucket relais-ingress-sessions).

    This replica's own count is exact and local. Other replicas learn it from KV, written by one
    background writer: AUTH does not wait for a KV round trip, a burst of logins and logouts of
    one account costs one write of its latest count, and writes of one key never overtake each
    other. Other replicas therefore see a change a round trip later than before, which the
    limit already tolerates (replicas accepting at the same instant can overshoot by a few).
    """

    def __init__(self, js: JetStreamContext, replica: str | None = None) -> None:
        self._js = js
        self.replica = replica or secrets.token_hex(6)
        self._mine: Counter[str] = Counter()
        # account -> replica -> (count, when we last heard it), for the other replicas' open
        # sessions. Replicas that crashed (a new name at every pod restart) leave their last
        # count behind, with no delete to say so: kept only while fresh (`_forget_stale`).
        self._others: dict[str, dict[str, tuple[int, float]]] = {}
        self._kv = None
        self._tasks: list[asyncio.Task[None]] = []
        # Accounts whose count changed since the writer last wrote it.
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._kv = await self._js.key_value(SESSIONS_BUCKET)
        self._tasks = [
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._writer()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # Python 3.11's wait_for (inside nats-py's request) drops a cancellation that races
            # with the reply: a writer cancelled just as its KV put returns would wait forever.
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._kv is not None:
            for account in list(self._mine):
                with contextlib.suppress(Exception):
                    await self._kv.delete(f"{account}.{self.replica}")

    def open_sessions(self, account: str) -> int:
        self._forget_stale(account, time.monotonic() - SESSIONS_TTL)
        return self._mine[account] + sum(n for n, _ in self._others.get(account, {}).values())

    def _forget_stale(self, account: str, cutoff: float) -> None:
        others = self._others.get(account, {})
        self._forget(account, [r for r, (_, seen) in others.items() if seen <= cutoff])

    def _forget(self, account: str, replicas: list[str]) -> None:
        """Drop these replicas' counts of `account`, and the account once none is left."""
        others = self._others.get(account)
        if others is None:
            return
        for replica in replicas:
            others.pop(replica, None)
        if not others:
            del self._others[account]

    async def acquire(self, account: str, limit: int) -> bool:
        if limit and self.open_sessions(account) >= limit:
            return False
        self._mine[account] += 1
        self._changed(account)
        return True

    def release(self, account: str) -> None:
        if self._mine[account] <= 0:
            return
        self._mine[account] -= 1
        self._changed(account)

    def _changed(self, account: str) -> None:
        self._dirty.add(account)
        self._wake.set()

    async def _writer(self) -> None:
        """The only writer of this replica's keys: each write carries the count as it is now."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                account = self._dirty.pop()
                if not await self._publish(account):
                    # NATS is away: keep the latest count for the next try, without spinning.
                    self._dirty.add(account)
                    await asyncio.sleep(1.0)

    async def _publish(self, account: str) -> bool:
        if self._kv is None:
            return True
        try:
            await self._kv.put(f"{account}.{self.replica}", str(self._mine[account]).encode())
        except Exception as exc:  # the local count still holds; the writer tries again
            log.warning("session count of %s not published: %r", account, exc)
            return False
        return True

    async def _heartbeat(self) -> None:
        # Other replicas ignore counts they have not heard of for SESSIONS_TTL.
        while True:
            await asyncio.sleep(SESSIONS_TTL / 3)
            for account, count in list(self._mine.items()):
                if count > 0:
                    self._changed(account)
            cutoff = time.monotonic() - SESSIONS_TTL
            for account in list(self._others):
                self._forget_stale(account, cutoff)

    async def _watch(self) -> None:
        assert self._kv is not None
        while True:
            try:
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue
                    account, _, replica = entry.key.rpartition(".")
                    if replica == self.replica:
                        continue
                    count = int(entry.value) if entry.operation not in ("DEL", "PURGE") and entry.value else 0
                    if count > 0:
                        self._others.setdefault(account, {})[replica] = (count, time.monotonic())
                    else:  # its sessions ended, or it stopped
                        self._forget(account, [replica])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("session watch interrupted: %r", exc)
                await asyncio.sleep(1.0)


class ConnectionGate:
    """Open connections per client IP on this replica, counted from the moment each is accepted;
    and, apart, connections per socket address still waiting for a PROXY header to name their
    client (the address is then a load balancer's, shared by all the clients behind it); and
    every connection per listener, from any address, against `ingress.max_connections`."""

    def __init__(self, config: IngressConfig) -> None:
        self._max = config.max_connections_per_ip
        self._max_waiting = config.max_proxy_pending_per_peer
        self._max_per_listener = config.max_connections
        self._open: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._seated: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        return _count(self._open, ip, self._max)

    def release(self, ip: str) -> None:
        _uncount(self._open, ip)

    def admit_waiting(self, peer: str) -> bool:
        return _count(self._waiting, peer, self._max_waiting)

    def release_waiting(self, peer: str) -> None:
        _uncount(self._waiting, peer)

    def open_connections(self, ip: str) -> int:
        return self._open[ip]

    def waiting_connections(self, peer: str) -> int:
        return self._waiting[peer]

    def seat(self, listener: str) -> bool:
        return _count(self._seated, listener, self._max_per_listener)

    def unseat(self, listener: str) -> None:
        _uncount(self._seated, listener)

    def listener_connections(self, listener: str) -> int:
        return self._seated[listener]


def _count(counter: Counter[str], key: str, limit: int) -> bool:
    if limit and counter[key] >= limit:
        return False
    counter[key] += 1
    return True


def _uncount(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class GatePass:
    """One connection's place in the gate: its seat on the listener and at most one count at a
    time, given back exactly once however the connection ends (a PROXY header read, a handshake
    that failed, a session over)."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._listener: str | None = None
        self._ip: str | None = None
        self._waiting: str | None = None

    def sit(self, listener: str) -> bool:
        """Take a seat on the connection's listener; False when it is full."""
        if not self._gate.seat(listener):
            return False
        self._listener = listener
        return True

    def admit(self, ip: str) -> bool:
        """Count the connection against its client IP (a PROXY header's: it waits no more)."""
        self._stop_waiting()
        if not self._gate.admit(ip):
            return False
        self._ip = ip
        return True

    @property
    def waiting(self) -> bool:
        """Counted against a load balancer: its PROXY header has not named the client yet."""
        return self._waiting is not None

    def wait(self, peer: str) -> bool:
        """Count the connection against `peer` until its PROXY header names the client."""
        if not self._gate.admit_waiting(peer):
            return False
        self._waiting = peer
        return True

    def release(self) -> None:
        self._stop_waiting()
        if self._ip is not None:
            self._gate.release(self._ip)
            self._ip = None
        if self._listener is not None:
            self._gate.unseat(self._listener)
            self._listener = None

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._gate.release_waiting(self._waiting)
            self._waiting = None
