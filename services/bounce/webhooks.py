"""Event webhooks: every event of an account, POSTed as signed JSON batches to its webhook URL.

Each account with a webhook has a durable consumer of its own (`webhooks-<account>` on
RELAIS_EVENTS, see `topology.ensure_webhooks_consumers`), so a slow or failing receiver holds
back only its own webhook, never mail nor another account's. An event is acked only after its
batch got a 2xx; otherwise it is nak'ed with a growing delay, and that account's posting pauses
for as long (no max_deliver: nothing is dropped; only the events stream's max age bounds how
long a receiver may stay down). A lost ack can re-send a batch, so each entry carries a stable
`event_id` for the receiver to de-duplicate.

Body: a JSON array, one object per event and recipient (the shape SendGrid's event webhook uses,
which senders already parse). Signature (Stripe-style, replay-protected by the timestamp):

    X-Relais-Timestamp: <unix seconds>
    X-Relais-Signature: v1=<hex HMAC-SHA256(webhook_secret, "<timestamp>." + body)>
    X-Relais-Signatures: v1=<hex under webhook_secret>[, v1=<hex under the previous secret>]

X-Relais-Signature is as it always was, one signature under the current secret, so a receiver
that compares the whole field with what it computed keeps working. X-Relais-Signatures is the
one to verify for a secret rotation without failed batches: during the rotation's overlap
(`relais account webhook --new-secret --overlap 24h`) it carries a signature under the previous
secret too, and a receiver accepts a POST when any entry matches the one it computes, whichever
of the two secrets it holds at that moment.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import nats
from nats.aio.msg import Msg
from opentelemetry.trace import StatusCode

from services.core import metrics, sockets, telemetry
from services.core.account_watch import AccountWatch
from services.core.bus import Bus, fetch
from services.core.config import AccountConfig, BounceConfig, Config, webhook_problem
from services.core.events import Event
from services.core.schedule import doubling
from services.core.topology import ensure_webhooks_consumers, webhooks_binding

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Relais-Timestamp"
SIGNATURE_HEADER = "X-Relais-Signature"
SIGNATURES_HEADER = "X-Relais-Signatures"
USER_AGENT = "Relais-Webhooks/1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def signature_headers(account: AccountConfig, timestamp: int, body: bytes, now: float) -> dict[str, str]:
    """The signature fields of a POST at `now`: the previous secret signs in X-Relais-Signatures
    too until its overlap ends (read from the account record, so every replica signs alike)."""
    current = sign(account.webhook_secret, timestamp, body)
    signatures = [current]
    if account.webhook_previous_secret and now < account.webhook_previous_secret_until:
        signatures.append(sign(account.webhook_previous_secret, timestamp, body))
    return {SIGNATURE_HEADER: current, SIGNATURES_HEADER: ", ".join(signatures)}


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = 300,
) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps.
    `signature` is either field: X-Relais-Signature, or X-Relais-Signatures, whose entries are
    comma-separated and any one of which may match."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    expected = sign(secret, ts, body).encode()
    # As bytes: compare_digest refuses a str with non-ASCII characters (TypeError, not False).
    return any(hmac.compare_digest(expected, entry.strip().encode()) for entry in signature.split(","))


def entries(event: Event, event_id: str) -> list[dict[str, Any]]:
    """SendGrid-style entries: one per recipient, flat fields, `event` and `timestamp`."""
    out = []
    for i, rcpt in enumerate(event.recipients or [""]):
        entry: dict[str, Any] = {
            "event": event.kind,
            "email": rcpt,
            "timestamp": int(event.at),
            "event_id": event_id if len(event.recipients) <= 1 else f"{event_id}.{i}",
            "message_id": event.message_id,
            "account": event.account,
        }
        if event.reply:
            entry["reply"] = event.reply
            entry["response"] = (
                f"{event.reply.get('code')} {event.reply.get('enhanced')} {event.reply.get('text')}"
            )
        for key in ("job_id", "sender", "pool", "mx_host", "source_ip", "trace_id"):
            value = getattr(event, key)
            if value:
                entry[key] = value
        if event.attempt:
            entry["attempt"] = event.attempt
        entry.update({k: v for k, v in event.detail.items() if k not in entry})
        out.append(entry)
    return out


def backoff(deliveries: int, config: BounceConfig) -> float:
    """Delay before the next try after `deliveries` failed ones: doubling, capped."""
    return doubling(config.webhook_retry_base, deliveries, config.webhook_retry_max)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle for every POST would cost the event loop milliseconds.
    return ssl.create_default_context()


async def post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    """One POST; returns the HTTP status. Bound the whole exchange with `asyncio.timeout`: a
    per-read timeout would let a receiver that trickles its answer a byte at a time hold the
    batch for ever."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc.rpartition('@')[2]}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *_basic_auth(parts),
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    reader, writer = await asyncio.open_connection(
        sock=await _connect(host, parts.port or (443 if https else 80)),
        ssl=_tls_context() if https else None,
        server_hostname=host if https else None,
    )
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        while True:
            status = await reader.readline()
            final = status.partition(b" ")[2][:1] != b"1"  # 100 Continue, other interim answers: read on
            # The rest of the head, so that the receiver is not cut off while it writes it; the
            # body says nothing the status does not. After the final status, a field over the
            # reader's line limit ends that courtesy, not the answer: a 2xx taken for a failure
            # would have the batch posted again for as long as the events stream keeps it.
            with contextlib.suppress(ValueError) if final else contextlib.nullcontext():
                while (await reader.readline()).strip():
                    pass
            if final:
                break
    finally:
        # Not waiting for the close: a TLS peer that never answers it would outlast the deadline.
        writer.close()
    version, _, rest = status.decode("latin-1").partition(" ")
    if not version.startswith("HTTP/") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP response: {status[:80]!r}")
    return int(rest[:3])


# One lookup thread per webhook host, not the event loop's default pool (a handful of threads
# that asyncio's own lookups share): there, a few receivers whose DNS hangs would hold up the
# lookups of every other account's receiver, and so its webhook. Lookups of one host wait for
# each other, so a hung one ties up one thread however often its POST is tried again. The thread
# ends with its host's last lookup (hung ones included): kept, there would be one for every host
# the service ever posted to. host -> [its thread, its lookups not finished]
_lookup_threads: dict[str, list[Any]] = {}
_lookup_threads_lock = threading.Lock()  # finished lookups are counted on their thread


def _look_up(host: str, port: int) -> concurrent.futures.Future[list[Any]]:
    """`getaddrinfo` of `host` on the host's lookup thread, started if it has none."""
    with _lookup_threads_lock:
        lookups = _lookup_threads.get(host)
        if lookups is None:
            lookups = _lookup_threads[host] = [concurrent.futures.ThreadPoolExecutor(1, "webhook-dns"), 0]
        lookups[1] += 1
        future = lookups[0].submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    future.add_done_callback(functools.partial(_looked_up, host, lookups))
    return future


def _looked_up(host: str, lookups: list[Any], _: concurrent.futures.Future[list[Any]]) -> None:
    with _lookup_threads_lock:
        lookups[1] -= 1
        if lookups[1] or _lookup_threads.get(host) is not lookups:
            return
        del _lookup_threads[host]
    lookups[0].shutdown(wait=False)  # its thread ends once this callback returns


async def _connect(host: str, port: int) -> socket.socket:
    """A TCP connection to the first of the host's addresses that takes one."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.wrap_future(_look_up(host, port))
    else:  # an address: nothing to look up, nothing that can hang
        infos = sockets.numeric_peers(host, port)
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        try:
            return await sockets.connect(family, kind, proto, address)
        except OSError as exc:
            errors.append(exc)
    raise OSError(f"cannot connect to {host} port {port}: {errors!r}")


def _basic_auth(parts: urllib.parse.SplitResult) -> list[str]:
    """The Authorization field for credentials in the URL (https://user:password@host/...),
    which is how Postmark lets a receiver protect its webhook with HTTP basic auth."""
    if parts.username is None:
        return []
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return [f"Authorization: Basic {token}"]


# How often the bounce service re-declares the webhooks consumers when no account changed.
_RECONCILE_INTERVAL = 60.0
# How long one fetch waits for events before the loop looks at `stop` again.
_FETCH_WAIT = 2.0
# How long a starting replica waits for the account records in KV before posting from the config
# file alone (as the ingress waits for its accounts): with KV away, webhooks are still posted.
_RECORDS_WAIT = 5.0


class WebhookDispatcher:
    """Posts the events of every account with a webhook: the config file's accounts, overlaid
    by the account records in KV (as the router reads them), followed live, so `relais account
    webhook` takes effect on every replica within moments."""

    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus
        # Failed POSTs in a row per account, on this replica. The events' own delivery counts
        # restart at 1 with every new event, so a dead receiver of a busy account would
        # otherwise be tried at the base delay for as long as it stays down.
        self._failures: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._records = AccountWatch(bus.js, {}, check_password_hash=False)
        self._records.on_change(self._accounts_changed)
        self._webhooks = self._with_webhooks()
        self._webhooks_compared = False  # the config file's webhooks with the records in KV
        # account -> the event that ends its posting loop after the batch in hand
        self._posting: dict[str, asyncio.Event] = {}
        self._loops: set[asyncio.Task[None]] = set()  # those ending included, awaited at stop

    @property
    def records(self) -> AccountWatch:
        """The account records as this replica follows them (started and stopped by `run`), for
        the bounce service's other readers: one watch of the bucket per process."""
        return self._records

    def webhook_accounts(self) -> list[str]:
        """The accounts whose events this replica posts now."""
        return sorted(self._webhooks)

    def _with_webhooks(self) -> dict[str, AccountConfig]:
        merged = {**self._config.accounts, **self._records.accounts}
        out = {}
        for name, account in merged.items():
            if not account.webhook_url:
                continue
            problem = webhook_problem(
                account.webhook_url,
                account.webhook_secret,
                previous_secret=account.webhook_previous_secret,
                previous_until=account.webhook_previous_secret_until,
            )
            if problem:
                # Only a record written around `relais account`, which checks the same rules, or
                # before it checked as much (a port out of range): not posted, rather than failing
                # every POST for as long as the events stream keeps the events.
                log.error("account %s: %s; its events are not posted", name, problem)
                continue
            out[name] = account
        return out

    def _accounts_changed(self) -> None:
        if not self._webhooks_compared:
            self._webhooks_compared = True
            self._warn_about_file_webhooks()
        self._webhooks = self._with_webhooks()
        self._changed.set()

    def _warn_about_file_webhooks(self) -> None:
        """The config file seeds an account's record once; a webhook edited there later (as it
        was read before webhooks followed KV) would otherwise be ignored without a word."""
        for name, seeded in self._config.accounts.items():
            record = self._records.accounts.get(name)
            if record is not None and (record.webhook_url, record.webhook_secret) != (
                seeded.webhook_url,
                seeded.webhook_secret,
            ):
                log.warning(
                    "account %s: the webhook in the config file differs from the account record in KV, "
                    "which is the one used; change it with `relais account webhook %s`",
                    name,
                    name,
                )

    async def run(self, stop: asyncio.Event) -> None:
        self._records.start()
        stopper = asyncio.create_task(_set_when(stop, self._changed))
        js, all_due = self._bus.js, 0.0
        try:
            await self._wait_for_records(stop)
            while not stop.is_set():
                self._changed.clear()
                wanted = self.webhook_accounts()
                new = [account for account in wanted if account not in self._posting]
                try:
                    # Every account's consumer at start and every minute, which also deletes an
                    # earlier release's shared consumer once none of its replicas is left; in
                    # between, those of webhooks just seen, before their posting starts (a
                    # change to any account must not cost a request per account with a webhook).
                    if time.monotonic() >= all_due:
                        all_due = time.monotonic() + _RECONCILE_INTERVAL
                        await ensure_webhooks_consumers(js, self._config, reconcile=True, accounts=wanted)
                    elif new:
                        await ensure_webhooks_consumers(js, self._config, reconcile=False, accounts=new)
                except Exception as exc:
                    log.warning("could not declare the webhooks consumers: %r", exc)
                self._follow(wanted)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(all_due - time.monotonic(), 0.0))
        finally:
            stopper.cancel()
            for done in self._posting.values():
                done.set()
            await asyncio.gather(*self._loops, return_exceptions=True)
            await self._records.stop()

    async def _wait_for_records(self, stop: asyncio.Event) -> None:
        """Until the account records are read, or `_RECORDS_WAIT`: a first pass on the config
        file's webhooks alone would post to a webhook the records have since removed or
        re-pointed, for as long as their first snapshot takes."""
        waits = [asyncio.create_task(self._records.loaded.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=_RECORDS_WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not self._records.loaded.is_set() and not stop.is_set():
            log.warning(
                "account records in KV not read within %.0fs; posting the config file's webhooks "
                "until they are",
                _RECORDS_WAIT,
            )

    def _follow(self, wanted: list[str]) -> None:
        """One posting loop per account with a webhook: new ones started, those of accounts
        whose webhook was removed ended once their batch in hand is settled."""
        for account in [name for name in self._posting if name not in wanted]:
            self._posting.pop(account).set()
            log.info("webhook of account %s removed; no longer posting its events", account)
        for account in wanted:
            if account not in self._posting:
                done = self._posting[account] = asyncio.Event()
                loop = asyncio.create_task(self._post_account(account, done))
                self._loops.add(loop)
                loop.add_done_callback(self._loops.discard)

    async def _post_account(self, account: str, stop: asyncio.Event) -> None:
        """Fetch a batch of the account's events, post it, and after a failure wait out the
        back-off before the next: its receiver gets one attempt at a time from this replica."""
        binding = webhooks_binding(account)
        sub = None
        while not stop.is_set():
            try:
                if sub is None:
                    sub = await self._bus.js.pull_subscribe_bind(binding.durable, binding.stream)
                try:
                    msgs = await fetch(self._bus, sub, self._config.bounce.webhook_batch, wait=_FETCH_WAIT)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pull from %s failed: %r", binding.durable, exc)
                await asyncio.sleep(0.5)
                continue
            try:
                pause = await self.deliver(account, msgs)
            except Exception as exc:
                # Unacked, the batch comes back after ack_wait; the loop, and the service, go on.
                log.exception("posting the webhook of account %s failed: %r", account, exc)
                pause = 1.0
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def deliver(self, account: str, msgs: Sequence[Msg]) -> float:
        """Post one batch of an account's events; returns how long to wait before the next
        (0 after a 2xx, else the back-off its events were nak'ed with). The batch goes in as
        many POSTs as `MAX_BODY` asks, in order; an event is acked once every POST that carried
        its entries got a 2xx, and after a failure the events not acked yet are nak'ed."""
        acct = self._webhooks.get(account)
        if acct is None:
            # Its webhook was removed since the fetch: not posted; back to the consumer, which
            # the removal deleted or which keeps them for a webhook set again.
            for msg in msgs:
                await _settle(msg.nak())
            return 0.0
        items: list[bytes] = []  # the body's entries, each encoded
        posted: list[tuple[Msg, int]] = []  # each decoded event, and the end of its entries
        for msg in msgs:
            try:
                meta = msg.metadata
                event_entries = entries(Event.from_json(msg.data), f"{meta.stream}-{meta.sequence.stream}")
            except Exception as exc:
                # Malformed (a field of the wrong type included): no retry mends it, and raised
                # here it would end the posting loop, and with it the bounce service.
                log.error("undecodable event on %s: %r", msg.subject, exc)
                await _settle(msg.term())
                metrics.observe_handler(webhooks_binding(account).durable, "poison", 0.0)
                continue
            items.extend(json.dumps(entry, separators=(",", ":")).encode() for entry in event_entries)
            posted.append((msg, len(items)))
        if not posted:
            return 0.0
        started = time.monotonic()
        keepalive = asyncio.create_task(_keep_in_progress(msgs, self._config.nats.ack_wait))
        acked = 0  # of `posted`
        problem = ""
        try:
            for first, last in _bodies(items):
                carried = [msg for msg, end in posted[acked:] if end > first]
                problem = await self._post(acct, account, b"[" + b",".join(items[first:last]) + b"]", carried)
                if problem:
                    break
                while acked < len(posted) and posted[acked][1] <= last:
                    await _settle(posted[acked][0].ack())
                    acked += 1
        finally:
            keepalive.cancel()
        metrics.observe_batch(webhooks_binding(account).durable, "ack", acked, time.monotonic() - started)
        if not problem:
            self._failures.pop(account, None)
            return 0.0
        left = [msg for msg, _ in posted[acked:]]
        failures = self._failures[account] = self._failures.get(account, 0) + 1
        deliveries = max(failures, *(m.metadata.num_delivered for m in left))
        delay = backoff(deliveries, self._config.bounce)
        log.warning(
            "webhook of account %s failed (%s); %d event(s) retried in %.1fs",
            account,
            problem,
            len(left),
            delay,
        )
        for msg in left:
            await _settle(msg.nak(delay=delay))
        metrics.observe_batch(
            webhooks_binding(account).durable, "retry", len(left), time.monotonic() - started
        )
        return delay

    async def _post(self, acct: AccountConfig, account: str, body: bytes, msgs: Sequence[Msg]) -> str:
        """One signed POST of `body` (entries of `msgs`); what went wrong, or "" for a 2xx."""
        now = time.time()
        ts = int(now)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: str(ts),
            **signature_headers(acct, ts, body, now),
        }
        try:
            with telemetry.linked_span(
                "webhook post", [m.headers for m in msgs], {telemetry.ACCOUNT: account}
            ) as span:
                async with asyncio.timeout(self._config.bounce.webhook_timeout):
                    status = await post(acct.webhook_url, body, headers)
                span.set_attribute("http.response.status_code", status)
                if not 200 <= status < 300:
                    # A failed post, as below (its events are retried): OpenTelemetry's HTTP
                    # conventions make a client span of a 4xx/5xx an error, named by its code.
                    span.set_attribute("error.type", str(status))
                    span.set_status(StatusCode.ERROR, f"HTTP {status}")
        except Exception as exc:
            return repr(exc)
        return "" if 200 <= status < 300 else f"HTTP {status}"


# The largest body a POST carries (unless one entry alone is larger): a batch's entries, one per
# event and recipient, would otherwise make megabytes, which a receiver's web server refuses
# (413: nginx's default client_max_body_size is 1 MiB) as often as the batch is posted again.
# SendGrid's event webhook posts at most 768 KB.
MAX_BODY = 768 * 1024


def _bodies(items: Sequence[bytes]) -> list[tuple[int, int]]:
    """`items` cut into runs [first, last) whose JSON array fits MAX_BODY, at least one each."""
    runs: list[tuple[int, int]] = []
    first, size = 0, 1  # "[" and, per entry, the entry and "," or "]"
    for i, item in enumerate(items):
        if i > first and size + len(item) + 1 > MAX_BODY:
            runs.append((first, i))
            first, size = i, 1
        size += len(item) + 1
    if items:
        runs.append((first, len(items)))
    return runs


async def _set_when(first: asyncio.Event, then: asyncio.Event) -> None:
    await first.wait()
    then.set()


async def _settle(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("webhook ack/nak failed (the event will come again): %r", exc)


async def _keep_in_progress(msgs: Sequence[Msg], ack_wait: float) -> None:
    # Every 10 s, or a third of a shorter ack_wait: a POST that outlasts ack_wait would
    # otherwise be made again by another replica.
    interval = min(10.0, max(ack_wait / 3, 0.5))
    with contextlib.suppress(asyncio.CancelledError, Exception):
        while True:
            await asyncio.sleep(interval)
            for msg in msgs:
                await msg.in_progress()
