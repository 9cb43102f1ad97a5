"""The transport: connect to NATS, publish with an acknowledgement deadline, pull and ack.

Errors here are typed by what they become at the edge: `BrokerUnavailable` is the ingress's
`451 4.3.0`, and a consumer's input is only acked after the handler returned, i.e. after every
output it published was acknowledged by JetStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, Header, PubAck, RawStreamMsg
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError

from services.core import metrics, telemetry
from services.core.config import Config, NatsConfig
from services.core.topology import ConsumerBinding, consumer_config

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class BrokerUnavailable(Exception):
    """JetStream did not acknowledge in time (down, partitioned, or slow). Ingress: 451 4.3.0.

    `maybe_stored`: a publish went out and no answer came back (a timeout), so the message may
    be stored all the same; False when it certainly was not (not connected, no responders, an
    error from the stream). `store_full`: JetStream refused it for want of room (`is_store_full`),
    which lasts until room is made, not through a leader election. Ingress: 452 4.3.1."""

    def __init__(self, reason: str, *, maybe_stored: bool = False, store_full: bool = False) -> None:
        super().__init__(reason)
        self.maybe_stored = maybe_stored
        self.store_full = store_full


# What nats-server answers a write that finds no room: its JetStream store is full
# (max_file_store: JSInsufficientResourcesErr), the account's is (max_store:
# JSAccountResourcesExceededErr), or a stream's own limits refuse new messages (discard new:
# JSStreamStoreFailedF with the store's error).
_NO_ROOM = frozenset({10023, 10002})
_STORE_FAILED = 10077
_STREAM_FULL = ("maximum bytes exceeded", "maximum messages exceeded")


def is_store_full(exc: BaseException) -> bool:
    """Whether JetStream refused a write for want of room."""
    if not isinstance(exc, APIError):
        return False
    if exc.err_code in _NO_ROOM:
        return True
    return exc.err_code == _STORE_FAILED and (exc.description or "").lower() in _STREAM_FULL


class DirectGetUnavailable(BrokerUnavailable):
    """Nobody answers direct gets on the stream (it does not allow them): use a plain get."""


class Retry(Exception):
    """A handler could not finish now; the input is redelivered after `delay` seconds."""

    def __init__(self, reason: str, delay: float = 5.0) -> None:
        super().__init__(reason)
        self.delay = delay


class Poison(Exception):
    """An input that can never be processed (undecodable; an inbound report given up after its
    deliveries went wrong). It is terminated, and logged loudly."""


# How long an input written by a later release waits for a replica that reads it.
_LATER_RELEASE_DELAY = 60.0


def undecodable(exc: Exception) -> Exception:
    """What a handler raises for an input it cannot decode. One a later release wrote (its
    decode error says `later_release`) is only new to this replica: during a rolling upgrade
    it waits for an upgraded one. Terminating it would drop accepted mail."""
    if getattr(exc, "later_release", False):
        return Retry(f"{exc}; left for a replica of a later release", delay=_LATER_RELEASE_DELAY)
    return Poison(str(exc))


# JSStreamWrongLastSequenceErr(F) / ...ConstantErr: a publish with an expected last (subject)
# sequence, i.e. a compare-and-set, lost.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
# Compare-and-set rounds on one KV key before contention is reported as BrokerUnavailable: each
# lost round means another writer (or a replica still behind one) got in first, and the writers
# of one key race a handful at a time.
CAS_ATTEMPTS = 50
# The header that marks a KV delete or purge, the last message of a deleted key.
_KV_OPERATION = "KV-Operation"


async def cas_won(write: Awaitable[object]) -> bool:
    """Run a KV write that expects the key's revision: False when another writer got in first
    (nats-py reports that as KeyWrongLastSequenceError, or as an APIError with its code)."""
    try:
        await write
    except KeyWrongLastSequenceError:
        return False
    except APIError as exc:
        if exc.err_code not in WRONG_LAST_SEQUENCE:
            raise
        return False
    return True


def is_kv_delete(msg: Msg | RawStreamMsg) -> bool:
    """Whether a KV stream message is a delete or purge marker: the key has no value."""
    return (msg.headers or {}).get(_KV_OPERATION) in ("DEL", "PURGE")


async def leader_last(js: JetStreamContext, stream: str, subject: str) -> RawStreamMsg | None:
    """The last message on `subject`, read through the stream leader (STREAM.MSG.GET); None when
    there is none. For a miss that must be believed: a direct get, which any replica may answer,
    misses what a replica behind the latest write has not applied yet."""
    try:
        return await js.get_msg(stream, subject=subject, direct=False)
    except NotFoundError:
        return None


# Publishes in flight at once through `Bus.background`; past that the caller waits for room, so
# a slow JetStream slows the handlers down instead of queueing without bound in memory.
BACKGROUND_MAX = 512
# How long an ack (with `confirm_acks`) or the outcomes of an attempt (`disposition.settle`)
# are retried while JetStream elects a new leader, before the input is left to redelivery.
ACK_PATIENCE = 30.0
# Subjects per batched direct get: the server answers up to 1024 at once.
_DIRECT_BATCH = 256


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    publish_timeout: float
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    _room: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _replies: dict[str, _Collector] = field(default_factory=dict, init=False, repr=False)
    _reply_prefix: str = field(default="", init=False, repr=False)

    def api_subject(self, request: str) -> str:
        """The JetStream API subject of `request` (e.g. "STREAM.INFO.<stream>"), under the
        context's prefix: "$JS.API" unless a JetStream domain is configured."""
        return f"{getattr(self.js, '_prefix', '$JS.API')}.{request}"

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a JetStream ack deadline, not a cancel scope
    ) -> PubAck:
        """Publish to JetStream and wait for its ack; raise BrokerUnavailable otherwise.

        The ack says `duplicate` when the stream already held this msg id (a redelivered stage
        publishing again): callers that count what they publish must not count it twice."""
        hdrs = dict(headers or {})
        if msg_id:
            hdrs[Header.MSG_ID] = msg_id
        if not self.nc.is_connected:
            # While reconnecting, nats-py would buffer the publish and flush it later, storing a
            # message whose sender we already told 451: refuse at once instead.
            raise BrokerUnavailable(f"publish to {subject}: not connected to NATS")
        with telemetry.producer_span(subject, hdrs, attributes):
            try:
                ack = await self.js.publish(
                    subject, payload, timeout=timeout or self.publish_timeout, headers=hdrs
                )
            except (TimeoutError, nats.errors.Error, APIError, OSError) as exc:
                metrics.PUBLISH_FAILURES.labels(metrics.subject_family(subject)).inc()
                raise BrokerUnavailable(
                    f"publish to {subject} failed: {exc!r}",
                    maybe_stored=isinstance(exc, TimeoutError),
                    store_full=is_store_full(exc),
                ) from exc
        metrics.PUBLISHED.labels(metrics.subject_family(subject)).inc()
        if ack.duplicate:
            log.debug("duplicate publish to %s suppressed (msg id %s)", subject, msg_id)
        return ack

    async def background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run `work` (a publish outside the durability contract, such as a `deferred` event whose
        durable step, the retry schedule, was already acknowledged) without making the caller
        wait for it. Returns once it is started; at most BACKGROUND_MAX run at once, beyond
        that the caller waits for room. `flush()` and `close()` wait for all of them. A failure
        is logged; retrying is the caller's choice (wrap the work in `patiently`). Anything a
        redelivery must re-create is published in line instead."""
        if self._room is None:
            self._room = asyncio.Semaphore(BACKGROUND_MAX)
        try:
            await self._room.acquire()
        except BaseException:
            work.close()  # never started: do not leave a coroutine that was never awaited
            raise
        task = asyncio.create_task(self._run_background(work, what))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        assert self._room is not None
        try:
            await work
        except Exception as exc:
            log.warning("%s lost: %r", what, exc)
        finally:
            self._room.release()

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a grace period
        """Wait until every `background` publish was acknowledged (or failed); with a `timeout`,
        cancel (and count in the log) what is still running when it passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._background:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                pending = list(self._background)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("%d background publish(es) not done before stopping", len(pending))
                return
            await asyncio.wait(list(self._background), timeout=remaining)

    async def get_last(self, stream: str, subjects: Sequence[str]) -> dict[str, Msg]:
        """The last message of each subject that has one, in one direct-get round trip per
        256 subjects (ADR-31 batched `multi_last`; the stream must allow direct gets).

        KV deletes come back too: their `KV-Operation` header says so.
        """
        found: dict[str, Msg] = {}
        for i in range(0, len(subjects), _DIRECT_BATCH):
            request = {"multi_last": list(subjects[i : i + _DIRECT_BATCH])}
            found.update(
                {m.headers["Nats-Subject"]: m for m in await self._direct(stream, request) if m.headers}
            )
        return found

    async def get_next(self, stream: str, subject: str, count: int, *, after: int = 0) -> list[Msg]:
        """Up to `count` messages of `subject` stored after sequence `after`, in stream order, in
        one direct-get round trip (ADR-31 batch; the stream must allow direct gets). Fewer may
        come back when the server caps a batch: ask again after the last `Nats-Sequence`."""
        return await self._direct(stream, {"seq": after + 1, "next_by_subj": subject, "batch": count})

    async def _direct(self, stream: str, request: dict[str, Any]) -> list[Msg]:
        if not self._reply_prefix:
            # One wildcard subscription for every batched get, as nats-py does for requests.
            self._reply_prefix = self.nc.new_inbox()
            await self.nc.subscribe(f"{self._reply_prefix}.*", cb=self._on_reply)
        token = self.nc._nuid.next().decode()
        collector = _Collector(asyncio.get_running_loop().create_future())
        self._replies[token] = collector
        try:
            await self.nc.publish(
                self.api_subject(f"DIRECT.GET.{stream}"),
                json.dumps(request).encode(),
                reply=f"{self._reply_prefix}.{token}",
            )
            status = await asyncio.wait_for(collector.done, self.publish_timeout)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BrokerUnavailable(f"direct get from {stream} failed: {exc!r}") from exc
        finally:
            self._replies.pop(token, None)
        # 204 ends a batch, 404 says none of the subjects has a message; anything else is an error.
        if status == "503":
            raise DirectGetUnavailable(f"no direct gets on {stream}")
        if status not in ("204", "404"):
            raise BrokerUnavailable(f"direct get from {stream} failed: status {status}")
        return collector.msgs

    async def _on_reply(self, msg: Msg) -> None:
        collector = self._replies.get(msg.subject.rpartition(".")[2])
        if collector is None or collector.done.done():
            return  # a late answer to a request that timed out
        status = (msg.headers or {}).get("Status")
        if status:
            collector.done.set_result(status)
        else:
            collector.msgs.append(msg)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush(self.publish_timeout * 2)
        with contextlib.suppress(Exception):
            await self.nc.drain()


@dataclass
class _Collector:
    """The messages of one batched direct get, until its end-of-batch status arrives."""

    done: asyncio.Future[str]
    msgs: list[Msg] = field(default_factory=list)


# A NATS user name that can be one subject token; other names keep nats-py's `_INBOX` prefix.
_INBOX_USER = re.compile(r"^[A-Za-z0-9_-]+$")


def inbox_prefix(user: str | None) -> str:
    """The prefix of a connection's inboxes: `_INBOX.<user>` for a named user, so that a NATS
    server can let each user subscribe to its own inboxes only (deploy/k8s/base/nats.conf).
    Replies, pulled messages and watched KV entries all come to inboxes: under one shared
    `_INBOX.>`, any user could read what every other one pulls."""
    return f"_INBOX.{user}" if user and _INBOX_USER.match(user) else "_INBOX"


# Rounds of tries at every server, half a second apart, before `connect` gives up on the first
# connection (a service's start-up tries again; an admin command says so and exits). nats-py
# would otherwise try for ever, so an unreachable URL or a refused login hung the caller silently.
_FIRST_CONNECT_ROUNDS = 10


async def connect(config: NatsConfig, name: str) -> Bus:
    """Connect with endless reconnects: a service outlives NATS restarts and leader moves. The
    first connection is not endless: BrokerUnavailable after `_FIRST_CONNECT_ROUNDS`."""
    options: dict[str, Any] = {
        "servers": [u.strip() for u in config.url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": config.connect_timeout,
        "max_reconnect_attempts": _FIRST_CONNECT_ROUNDS,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "inbox_prefix": inbox_prefix(config.user),
    }
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    if config.tls_ca_file:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=config.tls_ca_file)
    last_error: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        last_error[:] = [exc]
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    try:
        nc = await nats.connect(
            **options, error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect
        )
    except (nats.errors.Error, OSError) as exc:
        why = last_error[0] if last_error else exc
        raise BrokerUnavailable(f"cannot connect to NATS at {config.url}: {why!r}") from exc
    nc.options["max_reconnect_attempts"] = -1  # read on every reconnect: from now on, for ever
    return Bus(nc=nc, js=nc.jetstream(timeout=config.publish_timeout), publish_timeout=config.publish_timeout)


Handler = Callable[[Msg], Awaitable[None]]


def consume_declared(
    bus: Bus,
    config: Config,
    binding: ConsumerBinding,
    handler: Handler,
    *,
    concurrency: int,
    stop: asyncio.Event,
    confirm_acks: bool = False,
) -> Coroutine[Any, Any, None]:
    """`consume` from one of the topology's consumers, as `ensure_topology` declares it."""
    return consume(
        bus,
        binding,
        handler,
        concurrency=concurrency,
        stop=stop,
        ack_wait=config.nats.ack_wait,
        confirm_acks=confirm_acks,
        declared=consumer_config(binding, config),
    )


async def consume(
    bus: Bus,
    binding: ConsumerBinding,
    handler: Handler,
    *,
    concurrency: int,
    stop: asyncio.Event,
    ack_wait: float,
    batch: int = 64,
    confirm_acks: bool = False,
    declared: ConsumerConfig | None = None,
) -> None:
    """Pull from a durable consumer and run `handler` per message, up to `concurrency` at once.

    The message is acked when the handler returns, nak'ed with a delay on `Retry` or any
    unexpected error (it will come back, maybe to another replica), and terminated on `Poison`.
    While a handler runs, the message is kept in progress so a slow SMTP session does not make
    JetStream hand it to another replica.

    `confirm_acks`: wait for the server to confirm each ack, asking again while a consumer
    leader is being elected. For consumers whose redelivery repeats something the world sees
    (an SMTP transaction), where a lost ack would otherwise mean mail sent twice.

    `declared`: the consumer's configuration, to create it again should it go missing while
    the service runs (deleted by hand, or lost with a stream restored from a backup): until a
    restart, the service would otherwise pull from nothing.
    """
    inflight = 0
    missing_checked = 0.0
    room = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    sub = None
    # One ticker keeps every running message in progress (rather than a task per message, which
    # cost a task creation and cancellation on every message of every consumer).
    working: dict[int, tuple[Msg, float]] = {}

    async def server_ack_wait() -> float:
        return (await bus.js.consumer_info(binding.stream, binding.durable)).config.ack_wait or ack_wait

    ticker = asyncio.create_task(_keep_in_progress(working, ack_wait, server_ack_wait))

    async def run_one(msg: Msg) -> None:
        nonlocal inflight
        started = time.monotonic()
        working[id(msg)] = (msg, started)
        result = "ack"
        # A nak or term leaves `working` before it is sent: an "in progress" sent after a
        # delayed nak would replace the delay with a whole ack_wait.
        try:
            await handler(msg)
        except Retry as exc:
            result = "retry"
            log.info("retrying %s in %.0fs: %s", binding.durable, exc.delay, exc)
            working.pop(id(msg), None)
            await _settle(msg.nak(delay=exc.delay))
        except Poison as exc:
            result = "poison"
            log.error("terminating a message on %s that can never be processed: %s", binding.subject, exc)
            working.pop(id(msg), None)
            await _settle(msg.term())
        except Exception:
            result = "error"
            delay = _error_delay(msg)
            log.exception(
                "handler for %s failed; message will be redelivered in %.0fs", binding.durable, delay
            )
            working.pop(id(msg), None)
            await _settle(msg.nak(delay=delay))
        else:
            # Kept in progress while an ack is confirmed through a leader election.
            await (_confirm_ack(msg) if confirm_acks else _settle(msg.ack()))
        finally:
            working.pop(id(msg), None)
            metrics.observe_handler(binding.durable, result, time.monotonic() - started)
            inflight -= 1
            room.set()

    # Pull again only once a few slots are free (or none is busy): with every slot taken, a
    # pull per finished message would cost a request (and often a "no messages" status) per
    # message instead of per batch.
    low_water = max(1, min(batch, concurrency) // 8)
    try:
        while not stop.is_set():
            if concurrency - inflight < low_water and inflight > 0:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(room.wait(), 1.0)
                continue
            try:
                if sub is None:
                    sub = await bus.js.pull_subscribe_bind(binding.durable, binding.stream)
                try:
                    msgs = await fetch(bus, sub, min(batch, concurrency - inflight), wait=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # NATS down or the consumer missing for a moment: back off, the loop carries on.
                log.warning("pull from %s failed: %r", binding.durable, exc)
                if declared is not None and time.monotonic() - missing_checked > _MISSING_CHECK:
                    missing_checked = time.monotonic()
                    if await _recreated_if_missing(bus, binding, declared) and sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub = None
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                inflight += 1
                task = asyncio.create_task(run_one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        ticker.cancel()
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# How often a failing pull loop asks whether its consumer still exists (a pull from a deleted
# consumer fails like one from an unavailable JetStream: "no responders").
_MISSING_CHECK = 5.0


async def _recreated_if_missing(bus: Bus, binding: ConsumerBinding, declared: ConsumerConfig) -> bool:
    """Create the consumer again when JetStream says it does not exist; True when it was."""
    try:
        await bus.js.consumer_info(binding.stream, binding.durable)
        return False
    except NotFoundError:
        pass
    except Exception:
        return False  # JetStream itself is away: nothing to conclude
    try:
        await bus.js.add_consumer(binding.stream, declared)
    except Exception as exc:
        log.error("consumer %s is missing and could not be created again: %r", binding.durable, exc)
        return False
    log.error("consumer %s was missing: created it again", binding.durable)
    return True


async def fetch(bus: Bus, sub: JetStreamContext.PullSubscription, batch: int, *, wait: float) -> list[Msg]:
    """Up to `batch` messages from a pull subscription; raises TimeoutError when none came.

    While disconnected, nothing is asked for: nats-py would buffer each pull request and replay
    them all on reconnect, and the server would then push their sum (batch per second of the
    outage) at us. Whatever arrives beyond `batch` anyway (a request that outlived its fetch)
    is handed back at once: nats-py's fetch returns everything already queued locally, and a
    message held here unworked would time out and be handled twice."""
    if not bus.nc.is_connected:
        await asyncio.sleep(min(wait, 0.5))
        raise TimeoutError("not connected")
    msgs = await sub.fetch(batch, timeout=wait)
    for surplus in msgs[batch:]:
        await _settle(surplus.nak())
    return msgs[:batch]


def _error_delay(msg: Msg) -> float:
    """5 s after a handler's first unexpected failure, doubling up to 5 minutes: a message that
    fails the same way every time is retried (a fix or a recovered dependency lets it through)
    without a traceback every 5 seconds."""
    try:
        tries = msg.metadata.num_delivered or 1
    except Exception:
        tries = 1
    return min(5.0 * 2 ** min(tries - 1, 6), 300.0)


async def _settle(coro: Awaitable[None]) -> None:
    # A lost ack only means a redelivery, which every stage de-duplicates; never crash on it.
    try:
        await coro
    except Exception as exc:
        log.warning("ack/nak failed (message will be redelivered): %r", exc)


# What `patiently` retries: JetStream not answering (yet), as while a leader is elected.
UNANSWERED: tuple[type[BaseException], ...] = (BrokerUnavailable, TimeoutError, nats.errors.Error)


async def patiently(
    attempt: Callable[[], Awaitable[_T]],
    what: str,
    *,
    patience: float | None = None,
    retry: Callable[[BaseException], bool] | None = None,
    pauses: tuple[float, float] = (0.25, 4.0),
    stop: asyncio.Event | None = None,
) -> _T:
    """Run `attempt` again while JetStream does not answer (`retry`: by default an UNANSWERED
    error), with backoff from `pauses[0]` doubling to `pauses[1]`, for up to `patience` seconds
    (ACK_PATIENCE outlasts a leader election) or until `stop` is set; then raise its last error.
    Returns what the first answered attempt returned. The caller's input stays in progress
    meanwhile (see `consume`), so nobody else takes it up."""
    deadline = time.monotonic() + (ACK_PATIENCE if patience is None else patience)
    pause, longest = pauses
    while True:
        try:
            return await attempt()
        except Exception as exc:
            answered = not (retry(exc) if retry is not None else isinstance(exc, UNANSWERED))
            if answered or (stop is not None and stop.is_set()) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s: no answer yet, trying again in %.2fs: %r", what, pause, exc)
        if stop is None:
            await asyncio.sleep(pause)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
        pause = min(pause * 2, longest)


async def _confirm_ack(msg: Msg) -> None:
    """Ack and wait for the server to confirm it, through a consumer leader election."""
    try:
        await patiently(lambda: msg.ack_sync(timeout=2.0), "ack")
    except UNANSWERED as exc:
        log.warning("ack not confirmed (message will be redelivered): %r", exc)


# How often the in-progress ticker reads the consumer's ack_wait from the server again.
_ACK_WAIT_REREAD = 60.0


async def _keep_in_progress(
    working: dict[int, tuple[Msg, float]], ack_wait: float, server_ack_wait: Callable[[], Awaitable[float]]
) -> None:
    """Tell JetStream "still working" for each message held longer than a third of ack_wait.

    The ack_wait is the lower of this replica's and the consumer's as the server has it: the
    last replica to declare the consumer sets it, and during a rollout that lowers it, pacing by
    our own would let the server hand our messages to others (mail sent twice)."""
    interval = max(ack_wait / 3, 1.0)
    reread = 0.0
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            if time.monotonic() >= reread:
                reread = time.monotonic() + _ACK_WAIT_REREAD
                with contextlib.suppress(Exception):
                    interval = max(min(ack_wait, await server_ack_wait()) / 3, 1.0)
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for key, (msg, since) in list(working.items()):
                if now - since >= interval and key in working:
                    working[key] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
