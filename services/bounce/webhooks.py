"""Event webhooks: every event of an account, POSTed as signed JSON batches to its webhook URL.

A durable consumer of its own (`webhooks` on RELAIS_EVENTS, filtered to the accounts that have a
webhook; see `topology.webhook_filters`) so a slow or failing receiver holds back only its
webhook, never mail. An event is acked only after its batch got a 2xx; otherwise
it is nak'ed with a growing delay and comes back (no max_deliver: nothing is dropped; only the
events stream's max age bounds how long a receiver may stay down). A lost ack can re-send a
batch, so each entry carries a stable `event_id` for the receiver to de-duplicate.

Body: a JSON array, one object per event and recipient (the shape SendGrid's event webhook uses,
which senders already parse). Signature (Stripe-style, replay-protected by the timestamp):

    X-Relais-Timestamp: <unix seconds>
    X-Relais-Signature: v1=<hex HMAC-SHA256(webhook_secret, "<timestamp>." + body)>
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.msg import Msg

from services.core import telemetry
from services.core.bus import Bus
from services.core.config import BounceConfig, Config
from services.core.events import Event
from services.core.topology import (
    SubjectError,
    ensure_webhooks_consumer,
    parse_event_subject,
    webhook_filters,
    webhooks_binding,
)

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Relais-Timestamp"
SIGNATURE_HEADER = "X-Relais-Signature"
USER_AGENT = "Relais-Webhooks/1"
_MAX_BATCHES_IN_FLIGHT = 8


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = 300,
) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    # As bytes: compare_digest refuses a str with non-ASCII characters (TypeError, not False).
    return hmac.compare_digest(sign(secret, ts, body).encode(), signature.strip().encode())


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
    return min(config.webhook_retry_base * 2 ** max(deliveries - 1, 0), config.webhook_retry_max)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """One blocking POST (run in a thread); returns the HTTP status."""
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "", parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# How often the bounce service re-declares the webhooks consumer's filter from its configuration.
_RECONCILE_INTERVAL = 60.0


class WebhookDispatcher:
    def __init__(self, config: Config, bus: Bus) -> None:
        self._config = config
        self._bus = bus

    async def run(self, stop: asyncio.Event) -> None:
        reconciler = asyncio.create_task(self._reconcile(stop))
        try:
            if webhook_filters(self._config.accounts):
                await self._post(stop)
            else:
                await stop.wait()  # no account has a webhook: the consumer does not exist
        finally:
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler

    async def _reconcile(self, stop: asyncio.Event) -> None:
        """Keep the consumer's filter what this configuration says (`ensure_webhooks_consumer`)."""
        while not stop.is_set():
            try:
                await ensure_webhooks_consumer(self._bus.js, self._config, reconcile=True)
            except Exception as exc:
                log.warning("could not declare the webhooks consumer: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _RECONCILE_INTERVAL)

    async def _post(self, stop: asyncio.Event) -> None:
        """Fetch batches and post them, several batches at once: a receiver that hangs until the
        timeout holds back its own batch, not the other accounts' webhooks."""
        binding = webhooks_binding()
        sub = None
        inflight: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            if len(inflight) >= _MAX_BATCHES_IN_FLIGHT:
                await asyncio.wait(inflight, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                if sub is None:
                    sub = await self._bus.js.pull_subscribe_bind(binding.durable, binding.stream)
                try:
                    msgs = await sub.fetch(self._config.bounce.webhook_batch, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pull from %s failed: %r", binding.durable, exc)
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self.dispatch(msgs))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def dispatch(self, msgs: Sequence[Msg]) -> None:
        by_account: dict[str, list[Msg]] = {}
        for msg in msgs:
            try:
                account, _ = parse_event_subject(msg.subject)
            except SubjectError:
                account = ""
            acct = self._config.accounts.get(account)
            if acct is None or not acct.webhook_url:
                await _settle(msg.ack())  # no webhook for this account: nothing to deliver
                continue
            by_account.setdefault(account, []).append(msg)
        await asyncio.gather(*(self._deliver(name, batch) for name, batch in by_account.items()))

    async def _deliver(self, account: str, msgs: list[Msg]) -> None:
        acct = self._config.accounts[account]
        body_items: list[dict[str, Any]] = []
        for msg in msgs:
            try:
                event = Event.from_json(msg.data)
            except (ValueError, TypeError) as exc:
                log.error("undecodable event on %s: %s", msg.subject, exc)
                await _settle(msg.term())
                continue
            meta = msg.metadata
            body_items.extend(entries(event, f"{meta.stream}-{meta.sequence.stream}"))
        if not body_items:
            return
        body = json.dumps(body_items, separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(acct.webhook_secret, ts, body),
        }
        keepalive = asyncio.create_task(_keep_in_progress(msgs))
        try:
            with telemetry.linked_span(
                "webhook post", [m.headers for m in msgs], {telemetry.ACCOUNT: account}
            ) as span:
                status = await asyncio.to_thread(
                    post, acct.webhook_url, body, headers, self._config.bounce.webhook_timeout
                )
                span.set_attribute("http.response.status_code", status)
            problem = "" if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:
            problem = repr(exc)
        finally:
            keepalive.cancel()
        if not problem:
            for msg in msgs:
                await _settle(msg.ack())
            return
        deliveries = max(m.metadata.num_delivered for m in msgs)
        delay = backoff(deliveries, self._config.bounce)
        log.warning(
            "webhook of account %s failed (%s); %d event(s) retried in %.1fs",
            account,
            problem,
            len(msgs),
            delay,
        )
        for msg in msgs:
            await _settle(msg.nak(delay=delay))


async def _settle(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("webhook ack/nak failed (the event will come again): %r", exc)


async def _keep_in_progress(msgs: Sequence[Msg], interval: float = 10.0) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        while True:
            await asyncio.sleep(interval)
            for msg in msgs:
                await msg.in_progress()
