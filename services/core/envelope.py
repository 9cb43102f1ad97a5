"""The envelope: what travels between services, and its only msgpack codec.

The raw message bytes are carried untouched (msgpack `bin`), never re-encoded; large bodies are
not carried at all but referenced (see `services.core.bodies`).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from services.core.outcome import Bounced, Delivered, Reply

SCHEMA_VERSION = 1
# Verdicts and bounce notices that a service of an earlier release would misread (a verdict with
# suppressed recipients or a job to deliver, a notice with relayed recipients) are written under
# this schema version: that service leaves them to an upgraded replica (`NewerSchema`) instead
# of dropping them as malformed or acting on half of them.
NEXT_SCHEMA = 2


class EnvelopeDecodeError(ValueError):
    """A payload that is not an envelope of a schema version this code understands."""

    later_release = False


class NewerSchema(EnvelopeDecodeError):
    """An envelope of a schema version above this code's: a later release wrote it."""

    later_release = True


def new_message_id() -> str:
    """Queue id: millisecond time, then randomness: ids sort by arrival and never collide across replicas."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


# What `new_message_id` writes, and a job key: the message id, a dash, the job's number.
_MESSAGE_ID = re.compile(r"[0-9a-f]{23}")
_JOB_KEY = re.compile(r"(?P<message_id>[0-9a-f]{23})-[0-9]+")


def job_key(message_id: str, number: int) -> str:
    """The key of a message's job `number` (the router numbers a message's jobs from 0)."""
    return f"{message_id}-{number}"


def is_message_id(text: str) -> bool:
    return _MESSAGE_ID.fullmatch(text) is not None


def message_id_of_job(key: str) -> str:
    """The message id in a job key as `job_key` writes it; "" for anything else."""
    found = _JOB_KEY.fullmatch(key)
    return found["message_id"] if found else ""


# Envelope.meta keys that one service writes and another reads.
META_POOL = "pool"  # pool requested with X-Relais-Pool (ingress, checked there) -> router
META_SOURCE = "source"  # source address pinned by warm-up (router) -> delivery must send from it
META_WARMUP_DAY = "warmup_day"  # UTC day (YYYY-MM-DD) warm-up counted the pinned source for
META_DKIM = "dkim"  # DKIM-Signature field(s), CRLF-terminated (router) -> delivery prepends them


# MX hosts a job carries (`Envelope.mx_hosts`), best preference first: the router keeps no more.
# Every host rides in the envelope of each job and each retry (1500 records made a 297 KB
# envelope), and delivery never gets through more than a few per attempt anyway (Postfix stops at
# smtp_mx_address_limit = 5 addresses). A job holding this many may have left out hosts of its
# domain, so delivery cannot tell from its hosts alone that no MX host of the domain has an address.
MAX_MX_HOSTS = 10


@dataclass(frozen=True, slots=True)
class BodyRef:
    """Where the message bytes are: inline (small) or an Object Store object (large)."""

    size: int
    inline: bytes | None = None
    object_name: str = ""

    @property
    def is_inline(self) -> bool:
        return self.inline is not None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery (or routing) attempt and the reply it drew."""

    at: float
    reply: Reply
    mx_host: str = ""
    source_ip: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message (at the route stage) or one per-domain delivery job (after routing).

    `job_id` is empty until the router splits the message by recipient domain.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    account: str
    sender_domain: str
    body: BodyRef
    received_at: float = field(default_factory=time.time)
    job_id: str = ""
    pool: str = ""
    domain: str = ""
    site: str = ""
    mx_hosts: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    # W3C traceparent of the message's root span; kept here so retries hours later join the trace.
    trace_context: str = ""
    # "message" for mail from a sender, "dsn" for a notification Relais generated (never bounced again).
    kind: str = "message"
    # RFC 3461 parameters: RET (FULL/HDRS) and ENVID from MAIL FROM.
    dsn_ret: str = ""
    dsn_envid: str = ""
    # RFC 3461 RCPT parameters, per recipient address: NOTIFY as given ("NEVER" or a comma list
    # of SUCCESS, FAILURE, DELAY) and ORCPT decoded from xtext ("rfc822;bob@example.com").
    # A recipient not listed gave no parameter (NOTIFY then defaults to FAILURE,DELAY).
    dsn_notify: dict[str, str] = field(default_factory=dict)
    dsn_orcpt: dict[str, str] = field(default_factory=dict)
    client_ip: str = ""
    # When the ingress stops waiting for JetStream's ack and answers 451 (epoch seconds by the
    # NATS servers' clock; 0 = none). A copy stored later than this (e.g. flushed after a
    # reconnect) was refused and must not be sent.
    accept_by: float = 0.0
    # Free-form facts (TLS version, campaign tag) recorded by the ingress for events and traces.
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def attempt_count(self) -> int:
        return len(self.attempts)

    @property
    def key(self) -> str:
        """The identity of this unit of work: the job id once routed, else the message id."""
        return self.job_id or self.id

    def refused_when_stored_at(self, stored_at: float, clock_margin: float = 2.0) -> bool:
        """True when JetStream stored this submission after the ingress had answered 451.

        Only the first copy from the ingress carries `accept_by`. `stored_at` is by the clock of
        the server that stored it, so the ingress writes `accept_by` in the servers' clock: it
        measures its own clock's offset from theirs (`services.ingress.server_clock`). The margin
        absorbs what that measurement may be off by (half a round trip) and the skew between
        NATS servers; a copy stored within it after a 451 may still be delivered. Should the
        offset be wrong by more (the ingress host's clock stepped since it was last measured),
        a message the sender was told 250 for is dropped: the router logs each drop as an error.
        """
        return (
            bool(self.accept_by)
            and not self.job_id
            and not self.attempts
            and (stored_at > self.accept_by + clock_margin)
        )

    def with_attempt(self, attempt: Attempt) -> Envelope:
        return replace(self, attempts=(*self.attempts, attempt))

    def to_msgpack(self) -> bytes:
        return msgpack.packb(_envelope_to_wire(self), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Envelope:
        return _envelope_from_wire(_unpack(payload))


# RFC 3461 section 4.1: with no NOTIFY the MTA chooses; "FAILURE,DELAY" is what Postfix does.
DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})


def wants_dsn(env: Envelope) -> bool:
    """Never to the null sender, never about a DSN: that is how bounce loops start."""
    return bool(env.sender) and env.kind == "message"


def notify_of(env: Envelope, recipient: str) -> frozenset[str]:
    """The recipient's NOTIFY keywords (empty set for NEVER)."""
    given = env.dsn_notify.get(recipient) or env.dsn_notify.get(recipient.lower())
    if not given:
        return DEFAULT_NOTIFY
    words = frozenset(w.strip().upper() for w in given.split(",") if w.strip())
    return frozenset() if "NEVER" in words else words


# The NOTIFY keyword that asks for each DSN action (RFC 3461 section 4.1).
_NOTIFY_FOR = {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS"}


def dsn_recipients(env: Envelope, recipients: Sequence[str], *, action: str) -> list[str]:
    """The recipients a DSN reporting `action` ("failed", "delayed", "relayed") may mention."""
    if not wants_dsn(env):
        return []
    wanted = _NOTIFY_FOR[action]
    return [r for r in recipients if wanted in notify_of(env, r)]


@dataclass(frozen=True, slots=True)
class BounceNotice:
    """What one attempt of a delivery job tells the sender, for the bounce service: recipients
    that failed for good, and recipients delivered whose NOTIFY asked for SUCCESS."""

    envelope: Envelope
    failures: tuple[Bounced, ...]
    # False while other recipients of the same job are still being retried: the body stays.
    releases_body: bool = True
    # True for a "still trying" notice (RFC 3464 action "delayed"): `failures` then hold the
    # recipients still being retried with their last temporary reply; nothing failed for good,
    # no bounced/expired event is due and the body must stay (releases_body is False).
    delay_warning: bool = False
    # Delivered recipients that asked for a success DSN (RFC 3464 action "relayed"): Relais
    # passes no DSN request on to the MX, so, as RFC 3461 section 5.2.2 asks of an MTA relaying
    # to one that does not take them, it reports the relay itself. Their `delivered` events
    # are out already; the DSN is all that is due.
    relayed: tuple[Delivered, ...] = ()
    # A reference of the notice's own on a body in the Object Store, released once its DSN is
    # built. `settle` takes one when the job keeps the body for recipients still being retried
    # (releases_body False): their retry may end first, and must not take the headers (or
    # RET=FULL's message) away from this DSN.
    holds_body: str = ""

    def to_msgpack(self) -> bytes:
        wire: dict[str, Any] = {
            # A bounce service of an earlier release would not report relayed recipients, nor
            # release the body reference the notice holds: it leaves this version to an
            # upgraded one.
            "v": NEXT_SCHEMA if self.relayed or self.holds_body else SCHEMA_VERSION,
            "envelope": _envelope_to_wire(self.envelope),
            "failures": [
                {"rcpt": f.recipient, "reply": f.reply.to_dict(), "mx": f.mx_host, "exp": f.expired}
                for f in self.failures
            ],
            # Read only by bounce services of the previous version during a rolling upgrade.
            "expired": any(f.expired for f in self.failures),
            "release": self.releases_body,
            "delay": self.delay_warning,
        }
        if self.holds_body:
            wire["holds_body"] = self.holds_body
        if self.relayed:
            wire["relayed"] = [
                {"rcpt": d.recipient, "reply": d.reply.to_dict(), "mx": d.mx_host} for d in self.relayed
            ]
        return msgpack.packb(wire, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, payload: bytes) -> BounceNotice:
        wire = _unpack(payload, newest=NEXT_SCHEMA)
        try:
            # Notices written before expiry was per failure ("exp") said it once, for all of them.
            legacy_expired = bool(wire.get("expired", False))
            failures = tuple(
                Bounced(
                    f["rcpt"],
                    Reply.from_dict(f["reply"]),
                    f.get("mx", ""),
                    bool(f.get("exp", legacy_expired)),
                )
                for f in wire["failures"]
            )
            relayed = tuple(
                Delivered(d["rcpt"], Reply.from_dict(d["reply"]), d.get("mx", ""))
                for d in wire.get("relayed", ())
            )
            return cls(
                _envelope_from_wire(wire["envelope"]),
                failures,
                bool(wire.get("release", True)),
                bool(wire.get("delay", False)),
                relayed,
                str(wire.get("holds_body", "")),
            )
        except (KeyError, TypeError) as exc:
            raise EnvelopeDecodeError(f"malformed bounce notice: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Verdict:
    """A job's fate as a routing pass decided it, when it is more than a delivery job: every
    recipient bounced (no such domain, null MX) or deferred (DNS failure, warm-up cap, no pool)
    with one `reply`; or some recipients dropped for the suppression list (`suppressed`, for
    the reasons in `suppressed_for`), the others then delivered (`reply` None) or settled.

    It is stored in the delivery stream under the msg id the job's delivery job would have had
    (`job_msg_id`), so JetStream keeps whichever of the two a router stores first: a pass
    redelivered after a crash cannot give the job a second, different fate, even if the DNS
    answer or the suppression list changed in between. `decided_at` and `seed` make every
    handling of it settle alike (the same retry time, or expiry)."""

    envelope: Envelope
    reply: Reply | None
    bounce: bool
    decided_at: float
    seed: float
    suppressed: tuple[str, ...] = ()
    suppressed_for: str = ""

    def to_msgpack(self) -> bytes:
        wire = {
            "v": SCHEMA_VERSION if self.reply is not None and not self.suppressed else NEXT_SCHEMA,
            "envelope": _envelope_to_wire(self.envelope),
            "reply": self.reply.to_dict() if self.reply is not None else None,
            "bounce": self.bounce,
            "at": self.decided_at,
            "seed": self.seed,
        }
        if self.suppressed:
            wire["suppressed"] = list(self.suppressed)
            wire["suppressed_for"] = self.suppressed_for
        return msgpack.packb(wire, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Verdict:
        wire = _unpack(payload, newest=NEXT_SCHEMA)
        try:
            reply = wire["reply"]
            return cls(
                _envelope_from_wire(wire["envelope"]),
                Reply.from_dict(reply) if reply is not None else None,
                bool(wire["bounce"]),
                float(wire["at"]),
                float(wire["seed"]),
                tuple(wire.get("suppressed", ())),
                str(wire.get("suppressed_for", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvelopeDecodeError(f"malformed verdict: {exc}") from exc


def job_msg_id(env: Envelope) -> str:
    """The msg id of a routed job's one fate per attempt: its delivery job or its `Verdict`."""
    return f"{env.key}.{env.attempt_count}"


def _unpack(payload: bytes, newest: int = SCHEMA_VERSION) -> dict[str, Any]:
    try:
        wire = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EnvelopeDecodeError(f"not msgpack: {exc}") from exc
    version = wire.get("v") if isinstance(wire, dict) else None
    if not isinstance(version, int) or not SCHEMA_VERSION <= version <= newest:
        if isinstance(version, int) and version > newest:
            raise NewerSchema(f"envelope schema version {version}, this release reads {newest}")
        raise EnvelopeDecodeError(f"unsupported envelope schema version {version!r}")
    return wire


def _envelope_to_wire(env: Envelope) -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION,
        "id": env.id,
        "job": env.job_id,
        "from": env.sender,
        "rcpt": list(env.recipients),
        "acct": env.account,
        "sdom": env.sender_domain,
        "body": {"size": env.body.size, "inline": env.body.inline, "obj": env.body.object_name},
        "rcvd": env.received_at,
        "pool": env.pool,
        "dom": env.domain,
        "site": env.site,
        "mx": list(env.mx_hosts),
        "att": [
            {"at": a.at, "reply": a.reply.to_dict(), "mx": a.mx_host, "src": a.source_ip}
            for a in env.attempts
        ],
        "tp": env.trace_context,
        "kind": env.kind,
        "ret": env.dsn_ret,
        "envid": env.dsn_envid,
        "notify": env.dsn_notify,
        "orcpt": env.dsn_orcpt,
        "ip": env.client_ip,
        "by": env.accept_by,
        "meta": env.meta,
    }


def _envelope_from_wire(wire: dict[str, Any]) -> Envelope:
    try:
        body = wire["body"]
        return Envelope(
            id=wire["id"],
            job_id=wire.get("job", ""),
            sender=wire["from"],
            recipients=tuple(wire["rcpt"]),
            account=wire["acct"],
            sender_domain=wire["sdom"],
            body=BodyRef(size=body["size"], inline=body.get("inline"), object_name=body.get("obj", "")),
            received_at=wire["rcvd"],
            pool=wire.get("pool", ""),
            domain=wire.get("dom", ""),
            site=wire.get("site", ""),
            mx_hosts=tuple(wire.get("mx", ())),
            attempts=tuple(
                Attempt(a["at"], Reply.from_dict(a["reply"]), a.get("mx", ""), a.get("src", ""))
                for a in wire.get("att", ())
            ),
            trace_context=wire.get("tp", ""),
            kind=wire.get("kind", "message"),
            dsn_ret=wire.get("ret", ""),
            dsn_envid=wire.get("envid", ""),
            dsn_notify=dict(wire.get("notify") or {}),
            dsn_orcpt=dict(wire.get("orcpt") or {}),
            client_ip=wire.get("ip", ""),
            accept_by=float(wire.get("by", 0.0)),
            meta=dict(wire.get("meta") or {}),
        )
    except (KeyError, TypeError) as exc:
        raise EnvelopeDecodeError(f"malformed envelope: {exc}") from exc
