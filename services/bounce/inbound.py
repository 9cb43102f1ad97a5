"""Mail to Relais' own domains: asynchronous bounces and feedback-loop reports.

Nothing here trusts the message. A bounce or complaint counts only for a recipient that the
VERP token's MAC vouches for (`services.core.returnpath.verify`), and only while the token is
younger than `bounce.verp_max_age`; a forged report, a report for someone else's address, one to
an expired token or one without a token changes nothing and is only logged.

`findings` is the pure decision; `InboundHandler` does the I/O: suppression entries and events,
both acknowledged before the inbound envelope is. A report whose reading goes wrong
`MAX_DELIVERIES` times is given up (terminated, logged, counted); one whose outcome NATS cannot
take yet waits for it in place and uses no delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from typing import NoReturn, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import APIError
from opentelemetry.trace import Span

from services.bounce.arf import parse_arf
from services.bounce.classify import BounceCategory, BounceRule, is_hard
from services.bounce.parse import FailedRecipient, header_text, parse_bounce, parse_message
from services.bounce.policy import suppression_expiry
from services.core import bus as transport
from services.core import metrics
from services.core.account_watch import AccountWatch
from services.core.bodies import BodyMissing, BodyStore
from services.core.bus import Bus
from services.core.config import BounceConfig
from services.core.envelope import Envelope, EnvelopeDecodeError
from services.core.events import Event, publish_event
from services.core.held_bodies import HeldBodies
from services.core.outcome import Reply
from services.core.returnpath import ReturnPath, accounts_by_handle, is_current, parse_verp, verify
from services.core.suppression import Suppression, SuppressionList
from services.core.telemetry import consumer_span
from services.core.topology import inbound_subject

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Starts only where a run of address characters starts: unanchored, a long run without an "@"
# was tried from every one of its positions (quadratic; 40 s for one 128 KB header).
_ADDRESS = re.compile(r"(?<![^\s<>\"'(),;:])[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+")
# A real report carries one token, two with a forwarded copy; each token is checked against
# each address named, so a report stuffed with thousands of tokens must not cost that product.
_MAX_RETURN_PATHS = 8
# And only so many of the addresses a report names: one about our transaction names at most its
# recipients (Postfix's smtpd_recipient_limit is 1,000), while anyone can mail the feedback
# address a report naming 100,000 (800,000 MAC checks, 3 s of CPU with the event loop blocked).
_MAX_NAMED = 1_000
# Headers of a reported message that may name its recipient (FBLs often redact these).
_RECIPIENT_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To")
# Threads of their own: the default pool also runs asyncio's own getaddrinfo calls, and a slow
# lookup there would hold the parses up (webhook hosts have their own threads). Parsing is CPU
# under the GIL, so a second thread is only there for when one is busy with a large report.
_PARSERS = 2
# How long a starting replica waits for the account records before it reads its first report.
_RECORDS_WAIT = 5.0
# How many deliveries of one report may go wrong before it is given up: terminated, with an
# error logged and `relais_inbound_given_up` counted. The consumer has no max_deliver, so a report
# our code fails on came back for ever (a parse and an ack-pending slot each time), and one that
# has its replica killed for memory took a replica down every ack_wait. The count is
# num_delivered, so a delivery ends unfinished only when something went wrong: the handler raised
# (a bug, MemoryError), or the delivery ended unseen (the replica died or stopped while reading,
# an ack was lost). NATS not answering is waited out in place (`bus.patiently`) and costs none.
MAX_DELIVERIES = 5
# Waits for NATS in place: the first after 1 s, doubling up to a minute.
_WAIT_FIRST = 1.0
_WAIT_MAX = 60.0
# JSStreamMessageExceedsMaximumErr: the stream refuses a message over its max_msg_size.
_TOO_LARGE_FOR_STREAM = 10054


@dataclass(frozen=True, slots=True)
class Finding:
    """One verified fact: this recipient of this message bounced, or complained."""

    kind: str  # "bounced" | "complained"
    account: str
    message_id: str
    recipient: str
    category: str
    permanent: bool = True
    reply: Reply | None = None
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def suppresses(self) -> bool:
        if self.kind == "complained":
            return True
        # A remote MTA that gave up after temporary replies reports "failed" with its last 4xx:
        # like our own expiries, that says "not now" about the address, not "never".
        reply = self.reply
        temporary = reply is not None and (reply.is_transient or reply.enhanced_status.startswith("4"))
        return self.permanent and not temporary and is_hard(BounceCategory(self.category))


@dataclass(frozen=True, slots=True)
class Verdict:
    findings: list[Finding]
    # Why nothing (or not everything) counted: logged, and the test for forged bounces reads it.
    rejected: list[str]


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is NATS not answering (yet), which a later try may not meet: no fault of
    the report's. JetStream refusing what the report made as too large (for a NATS message or for
    the stream) is an answer, the same every time: that failure is the report's own."""
    if isinstance(exc, transport.Retry):
        return True
    if not isinstance(exc, transport.UNANSWERED):
        return False
    cause = exc.__cause__ if isinstance(exc, transport.BrokerUnavailable) else exc
    if isinstance(cause, nats.errors.MaxPayloadError):
        return False
    return not (isinstance(cause, APIError) and cause.err_code == _TOO_LARGE_FOR_STREAM)


def _delivery(msg: Msg) -> tuple[int, int]:
    """Which delivery of its message `msg` is, and the message's stream sequence."""
    try:
        return msg.metadata.num_delivered or 1, msg.metadata.sequence.stream
    except Exception:  # not from a JetStream consumer
        return 1, 0


def return_paths(
    addresses: Iterable[str], config: BounceConfig, accounts: Mapping[str, str] | None = None
) -> list[ReturnPath]:
    """The distinct VERP return paths among `addresses`, in order, at most _MAX_RETURN_PATHS.
    `accounts`: `accounts_by_handle` of every account, for return paths that carry a handle."""
    out: dict[ReturnPath, None] = {}
    for address in addresses:
        path = parse_verp(
            address, prefix=config.verp_prefix, domain=config.return_path_domain, accounts=accounts
        )
        if path is not None:
            out[path] = None
            if len(out) == _MAX_RETURN_PATHS:
                break
    return list(out)


def _header_addresses(msg: Message | None, names: Sequence[str]) -> list[str]:
    if msg is None:
        return []
    values = [header_text(v) for name in names for v in (msg.get_all(name) or [])]
    parsed = [addr for _, addr in email.utils.getaddresses(values) if "@" in addr]
    return parsed or [m.group(0) for v in values for m in _ADDRESS.finditer(v)]


def current_paths(
    paths: Sequence[ReturnPath], config: BounceConfig, now: float
) -> tuple[list[ReturnPath], list[str]]:
    """The paths still young enough to be believed, and why the others were set aside."""
    current = [p for p in paths if is_current(p, now=now, max_age=config.verp_max_age)]
    stale = [f"token of message {p.message_id} past bounce.verp_max_age" for p in paths if p not in current]
    return current, stale


def findings(
    raw: bytes,
    local_recipients: Sequence[str],
    config: BounceConfig,
    rules: Sequence[BounceRule],
    now: float | None = None,
    accounts: Mapping[str, str] | None = None,
) -> Verdict:
    """`accounts`: `accounts_by_handle` of every account (return paths of long account names)."""
    now = time.time() if now is None else now
    if not config.return_path_domain or not config.verp_secrets:
        return Verdict([], ["no return path domain/secrets configured: cannot authenticate reports"])
    msg = parse_message(raw)
    report = parse_arf(msg)
    if report is not None:
        # An FBL sends to the feedback address; the token is in the report's Original-Mail-From,
        # the reported message's Return-Path (or any header that carries it), or the report came
        # to the VERP address itself. Only the first few tokens are checked, and the sender
        # writes its own header fields, look-alike tokens included: so what the sender cannot
        # write comes first, and the reported fields in their order, where the receiver's
        # Return-Path and trace fields stand above the sender's.
        headers = report.original.values() if report.original is not None else []
        scanned = [m.group(0) for v in headers for m in _ADDRESS.finditer(str(v))]
        paths, stale = current_paths(
            return_paths([*local_recipients, report.original_mail_from, *scanned], config, accounts),
            config,
            now,
        )
        candidates = report.original_rcpt_to
        if not candidates:
            # The report redacts the recipient, so guess from the reported message's headers.
            # That names the complainer only when the token binds one recipient; a token for
            # a recipient domain would vouch for every colleague in To: and Cc: as well.
            candidates = _header_addresses(report.original, _RECIPIENT_HEADERS)
            paths = [p for p in paths if p.single_recipient]
        if not report.is_complaint:
            return Verdict([], [f"feedback type {report.feedback_type!r} is not a complaint"])
        detail = {"feedback_type": report.feedback_type, "source": "fbl"}
        if report.user_agent:
            detail["user_agent"] = report.user_agent
        return _verified("complained", paths, [([c], None) for c in candidates], config, detail, stale)

    paths, stale = current_paths(return_paths(local_recipients, config, accounts), config, now)
    parsed = parse_bounce(msg, rules)
    if parsed.kind == "none":
        return Verdict([], ["not a bounce or feedback report"])
    failed = [([r.recipient, r.also_known_as], r) for r in parsed.recipients]
    detail = {"source": "async", "format": parsed.kind}
    if parsed.reporting_mta:
        detail["reporting_mta"] = parsed.reporting_mta
    return _verified("bounced", paths, failed, config, detail, stale)


def _verified(
    kind: str,
    paths: list[ReturnPath],
    candidates: Sequence[tuple[Sequence[str], FailedRecipient | None]],
    config: BounceConfig,
    detail: dict[str, str],
    stale: Sequence[str] = (),
) -> Verdict:
    if not paths:
        return Verdict([], [*stale, f"{kind}: no valid return path token"])
    out: list[Finding] = []
    rejected: list[str] = list(stale)
    seen: set[tuple[str, str, str]] = set()
    if len(candidates) > _MAX_NAMED:
        rejected.append(f"{kind}: {len(candidates)} recipients named, only the first {_MAX_NAMED} checked")
    for names, info in candidates[:_MAX_NAMED]:
        match = _first_vouched(paths, [n for n in names if n], config.verp_secrets)
        if match is None:
            rejected.append(f"{kind}: token does not vouch for {' / '.join(n for n in names if n)!r}")
            continue
        path, recipient = match
        key = (path.account, path.message_id, recipient.lower())
        if key in seen:
            continue
        seen.add(key)
        if kind == "complained":
            out.append(Finding(kind, path.account, path.message_id, recipient, "complaint", detail=detail))
        elif info is not None:
            out.append(_bounce_finding(path, recipient, info, detail))
    if not candidates:
        rejected.append(f"{kind}: no recipient named in the report")
    return Verdict(out, rejected)


def _first_vouched(
    paths: Sequence[ReturnPath], names: Sequence[str], secrets: Sequence[str]
) -> tuple[ReturnPath, str] | None:
    for name in names:
        for path in paths:
            if verify(path, name, secrets):
                return path, name
    return None


def _bounce_finding(
    path: ReturnPath, recipient: str, info: FailedRecipient, detail: dict[str, str]
) -> Finding:
    code = info.code
    status = info.status or ("5.0.0" if info.permanent else "4.0.0")
    reply = Reply(code, status, info.diagnostic or f"{info.category} (reported by a later MTA)", "ASYNC")
    extra = {"category": str(info.category)}
    if info.remote_mta:
        extra["remote_mta"] = info.remote_mta
    return Finding(
        "bounced",
        path.account,
        path.message_id,
        recipient,
        str(info.category),
        permanent=info.permanent,
        reply=reply,
        detail={**detail, **extra},
    )


class InboundHandler:
    """Consumer of `relais.inbound` (durable `bounce-inbound`). `accounts` is the bounce
    service's watch of the account records (run by its webhooks): a return path of a long account
    name carries only a handle, which the names of the records resolve."""

    def __init__(
        self,
        config: BounceConfig,
        bus: Bus,
        bodies: BodyStore,
        rules: Sequence[BounceRule],
        accounts: AccountWatch,
        held: HeldBodies,
    ) -> None:
        """`held`: the bounce process's budget of stored bodies (`bounce.max_buffered_bytes`)."""
        self._config = config
        self._bus = bus
        self._bodies = bodies
        self._rules = rules
        self._suppression = SuppressionList(bus.js)
        self._parsers = ThreadPoolExecutor(_PARSERS, thread_name_prefix="relais-report")
        self._accounts = accounts
        self._held = held
        accounts.on_change(self._accounts_changed)
        self._handles: dict[str, str] | None = None  # built from the names when first needed

    def _accounts_changed(self) -> None:
        self._handles = None

    async def _account_handles(self) -> dict[str, str]:
        """Every account's handle, once the records in KV are read (the config file's accounts
        are seeded there; `relais account add` writes only there): a bounce must not be dropped
        because this replica started a moment ago, nor while KV cannot be read (it waits)."""
        if not self._accounts.loaded.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._accounts.loaded.wait(), _RECORDS_WAIT)
            if not self._accounts.loaded.is_set():
                raise transport.Retry("account records in KV not read yet")
        if self._handles is None:
            # Built here, on the event loop, which alone changes the names; the parse threads
            # only read the finished index.
            self._handles = accounts_by_handle(self._accounts.accounts)
        return self._handles

    async def handle(self, msg: Msg, stop: asyncio.Event | None = None) -> None:
        """Read one report. `stop` set: the replica is stopping, and a report waiting for NATS
        is let go (nak'ed; it comes back)."""
        try:
            env = Envelope.from_msgpack(msg.data)
        except EnvelopeDecodeError as exc:
            raise transport.undecodable(exc) from exc
        delivery, seq = _delivery(msg)
        if delivery > MAX_DELIVERIES:
            await self._give_up(env, seq, delivery, None)
        with consumer_span(inbound_subject(), msg.headers, {"relais.message_id": env.id}) as span:
            try:
                await self._read(env, span, stop or asyncio.Event())
            except Exception as exc:  # MemoryError too: another replica had its chances
                if delivery < MAX_DELIVERIES or is_transient(exc):
                    raise  # nak'ed: back after the consumer's backoff
                await self._give_up(env, seq, delivery, exc)

    async def _give_up(self, env: Envelope, seq: int, delivery: int, exc: Exception | None) -> NoReturn:
        """Terminate a report whose MAX_DELIVERIES deliveries all went wrong, loudly."""
        if exc is None:
            # Delivery MAX_DELIVERIES did not end with an error (that would have ended it there),
            # so it ended unseen: read again, the report may take this replica down too.
            log.error(
                "inbound %s (stream seq %d) from <%s>: giving up on it at delivery %d, after %d that "
                "went wrong, the last unseen: its replica died or stopped while reading it",
                env.id,
                seq,
                env.sender,
                delivery,
                delivery - 1,
            )
        else:
            log.error(
                "inbound %s (stream seq %d) from <%s>: giving up on it, delivery %d failed too: %r",
                env.id,
                seq,
                env.sender,
                delivery,
                exc,
                exc_info=exc,
            )
        metrics.INBOUND_GIVEN_UP.labels("lost" if exc is None else "error").inc()
        await self._bodies.discard(env.body)  # never raises: a body left behind expires by TTL
        raise transport.Poison(f"inbound {env.id} (stream seq {seq}) given up at delivery {delivery}")

    async def _read(self, env: Envelope, span: Span, stop: asyncio.Event) -> None:
        def patiently(step: Callable[[], Awaitable[_T]], what: str) -> Awaitable[_T]:
            # Until NATS answers or the replica stops: nak'ed, every try would count towards
            # MAX_DELIVERIES, and an outage of a few minutes (a stream without its leader, a full
            # store) would have every report that came meanwhile given up.
            return transport.patiently(
                step,
                f"inbound {env.id}: {what}",
                patience=math.inf,
                retry=is_transient,
                pauses=(_WAIT_FIRST, _WAIT_MAX),
                stop=stop,
            )

        # Held from the fetch to the parse's end (bounce.max_buffered_bytes), the report waiting
        # for room in progress: a few reports of max_message_size at once would have the pod
        # killed for memory, and the same reports come back to the next replica.
        async with self._held.holding_body(env.body):
            try:
                raw = await patiently(lambda: self._bodies.get(env.body), "body")
            except BodyMissing:
                log.info("inbound %s already processed (body gone)", env.id)
                return
            handles = await patiently(self._account_handles, "account records")
            try:
                # Off the event loop: anyone can mail us a report of max_message_size, and the
                # parse of one of 50 MB takes half a minute, in which nothing else would move.
                verdict = await asyncio.get_running_loop().run_in_executor(
                    self._parsers,
                    findings,
                    raw,
                    env.recipients,
                    self._config,
                    self._rules,
                    time.time(),
                    handles,
                )
            except MemoryError:
                raise  # this replica's trouble, maybe not the message's: another may manage it
            except Exception as exc:
                # Parsing is deterministic, so no retry mends a message our parsers choke on (a
                # nesting too deep, an unknown charset codec): redelivered, it would come back
                # forever. It is logged and counts for nothing, like any message not a report.
                log.warning("inbound %s from <%s> could not be parsed: %r", env.id, env.sender, exc)
                verdict = Verdict([], [f"unparsable: {exc!r}"])
            del raw  # the outcomes need none of it, and may wait long for NATS
        for reason in verdict.rejected:
            log.warning("inbound %s from <%s>: %s", env.id, env.sender, reason)
        span.set_attribute("relais.findings", len(verdict.findings))
        for finding in verdict.findings:
            await patiently(lambda f=finding: self.apply(f, inbound_id=env.id), "outcome")
        await self._bodies.discard(env.body)

    async def apply(self, finding: Finding, *, inbound_id: str) -> None:
        if finding.suppresses:
            reason = "complaint" if finding.kind == "complained" else "hard_bounce"
            await self._suppression.add(
                Suppression(
                    account=finding.account,
                    address=finding.recipient.lower(),
                    reason=reason,
                    source=finding.message_id,
                    category="" if finding.kind == "complained" else finding.category,
                    expires_at=suppression_expiry(self._config),
                ),
                keep_longer=True,
            )
        detail = {**finding.detail, "inbound_id": inbound_id}
        if finding.suppresses:
            detail["suppressed"] = "true"
        if finding.kind == "bounced" and not finding.permanent:
            # A remote "still trying" notice: worth a log line, not an outcome.
            log.info("delay notice for %s of %s", finding.recipient, finding.message_id)
            return
        event = Event(
            kind=finding.kind,
            message_id=finding.message_id,
            account=finding.account,
            recipients=[finding.recipient],
            reply=finding.reply.to_dict() if finding.reply else None,
            detail=detail,
        )
        prefix = "fbl" if finding.kind == "complained" else "abn"
        await publish_event(
            self._bus, event, msg_id=f"{prefix}-{finding.message_id}-{finding.recipient.lower()}"
        )
