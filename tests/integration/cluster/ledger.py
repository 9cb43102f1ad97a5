"""The books of a fault scenario: what was sent, what the ingress answered, where each recipient ended.

Every recipient address is unique to its message (the scenario tag and message number are in
the local part), so the sinks and the events stream can be matched to the client's log without
trusting anything Relais says about itself.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import nats.errors
from nats.js.errors import APIError

from tests.support.cluster import SENDER_DOMAIN, Cluster, Event, EventLog
from tests.support.smtp_load import Result, Submission

FINAL_KINDS = ("delivered", "bounced", "expired")
BOUNCE_REPLY = "550 5.1.1 No such user here"
_FINAL_RECIPIENT = re.compile(rb"^Final-Recipient:\s*rfc822;\s*<?([^>\s]+)>?", re.IGNORECASE | re.MULTILINE)
_ACTION = re.compile(rb"^Action:\s*([A-Za-z]+)", re.IGNORECASE | re.MULTILINE)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# After the last outcome, how long the pipeline may take to go idle: a job whose worker died
# after sending is handed out again only after ack_wait, and its second copy comes after that.
IDLE_ACK_WAITS = 3


def plan(
    tag: str, count: int, domains: list[str], *, bounce_every: int = 40, pair_every: int = 5
) -> list[Submission]:
    """`count` messages: mostly one recipient, every `pair_every`-th two (in two domains), and
    every `bounce_every`-th addressed to a mailbox the destination rejects with 550."""
    subs: list[Submission] = []
    for i in range(count):
        domain = domains[i % len(domains)]
        local = f"bounce-{tag}-{i}" if bounce_every and i % bounce_every == bounce_every - 1 else f"{tag}-{i}"
        recipients = [f"{local}@{domain}"]
        if pair_every and i % pair_every == 0:
            recipients.append(f"{tag}-{i}-b@{domains[(i + 1) % len(domains)]}")
        header = f"X-Relais-Test: {tag}-{i}"
        data = (
            f"From: <news@{SENDER_DOMAIN}>\r\nTo: <{recipients[0]}>\r\nSubject: {tag} {i}\r\n{header}\r\n"
            f"Message-ID: <{tag}-{i}@{SENDER_DOMAIN}>\r\n\r\nMessage {i} of scenario {tag}.\r\n"
        ).encode()
        subs.append(Submission(f"{tag}-{i}", f"news@{SENDER_DOMAIN}", tuple(recipients), data))
    return subs


def refuse(cluster: Cluster, recipients: Iterable[str]) -> None:
    """Have each recipient's destination reject it with BOUNCE_REPLY."""
    for rcpt in recipients:
        cluster.sinks[rcpt.rpartition("@")[2]].rcpt_replies[rcpt] = BOUNCE_REPLY


def program_bounces(cluster: Cluster, subs: list[Submission]) -> None:
    refuse(cluster, (r for sub in subs for r in sub.recipients if r.startswith("bounce-")))


@dataclass
class Books:
    results: list[Result]
    events: list[Event]
    sink_copies: collections.Counter[str]
    dsn_copies: collections.Counter[str]
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self, title: str) -> str:
        width = max(len(k) for k in self.counts)
        lines = [f"\n== {title} =="] + [f"  {k:<{width}}  {v}" for k, v in self.counts.items()]
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}), first 10:")
            lines += [f"    {p}" for p in self.problems[:10]]
        return "\n".join(lines)


def _final_by_recipient(events: list[Event]) -> dict[str, list[Event]]:
    finals: dict[str, list[Event]] = collections.defaultdict(list)
    for event in events:
        if event.kind in FINAL_KINDS:
            for rcpt in event.recipients:
                finals[rcpt].append(event)
    return finals


def _sink_copies(cluster: Cluster) -> collections.Counter[str]:
    copies: collections.Counter[str] = collections.Counter()
    for sink in cluster.sinks.values():
        for message in list(sink.messages):
            copies.update(message.rcpt_tos)
    return copies


def dsn_recipients(cluster: Cluster) -> list[list[str]]:
    """The Final-Recipient addresses of each DSN that reached the sender's MX."""
    return [
        [m.decode() for m in _FINAL_RECIPIENT.findall(message.data)]
        for message in list(cluster.sender_mx.messages)
    ]


def _failed_dsn_copies(cluster: Cluster) -> collections.Counter[str]:
    """How many DSNs at the sender's MX report each recipient as failed (RFC 3464 Action)."""
    copies: collections.Counter[str] = collections.Counter()
    for message in list(cluster.sender_mx.messages):
        # The per-recipient blocks of the message/delivery-status part are separated by blank lines.
        for block in _BLANK_LINE.split(message.data):
            recipient, action = _FINAL_RECIPIENT.search(block), _ACTION.search(block)
            if recipient and action and action.group(1).lower() == b"failed":
                copies[recipient.group(1).decode()] += 1
    return copies


async def wait_idle(cluster: Cluster, timeout: float) -> dict[str, tuple[int, int]]:  # noqa: ASYNC109
    """Until no service consumer has work pending or unacked (twice in a row: a job moving on
    is published downstream before it is acked upstream, except a DSN going back to the
    start); returns what was still busy at the timeout, empty if nothing."""
    deadline = time.monotonic() + timeout
    busy: dict[str, tuple[int, int]] = {"(not asked yet)": (0, 0)}
    quiet = 0
    while time.monotonic() < deadline:
        try:
            busy = await cluster.in_flight()
        except (OSError, TimeoutError, nats.errors.Error, APIError) as exc:
            busy, quiet = {f"(no answer: {exc!r})": (0, 0)}, 0
        else:
            quiet = 0 if busy else quiet + 1
            if quiet == 2:
                return {}
        await asyncio.sleep(1.0)
    return busy


async def settle_and_audit(
    cluster: Cluster,
    results: list[Result],
    *,
    timeout: float = 240.0,  # noqa: ASYNC109 - a settling budget, not a cancel scope
    max_duplicates: int = 0,
) -> Books:
    """Wait until every accepted recipient reached a final outcome (or the timeout), then audit."""
    accepted = {r for res in results if res.accepted for r in res.submission.recipients}
    log = EventLog(cluster.nats.urls)
    deadline = time.monotonic() + timeout
    finals: dict[str, list[Event]] = {}
    while True:
        await log.poll()
        finals = _final_by_recipient(log.events)
        waiting = [r for r in accepted if r not in finals]
        # DSNs travel a whole second trip through the cluster after the bounced event.
        dsns = _failed_dsn_copies(cluster)
        dsn_waiting = [
            r for r in accepted if any(e.kind != "delivered" for e in finals.get(r, [])) and r not in dsns
        ]
        if (not waiting and not dsn_waiting) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    # Duplicates (and second outcomes) come from work still in flight, such as a job handed out
    # again after its worker died: count them once none is left, not after a fixed pause.
    assert cluster.config is not None
    busy = await wait_idle(cluster, IDLE_ACK_WAITS * cluster.config.nats.ack_wait + 10.0)
    # The final audit reads the whole stream afresh rather than trusting the incremental reader.
    full = EventLog(cluster.nats.urls)
    await full.read_to_end()
    books = audit(cluster, results, full.events, max_duplicates=max_duplicates)
    if busy:
        books.problems.append(f"work still in flight after the last outcome: {busy}")
    return books


def audit(cluster: Cluster, results: list[Result], events: list[Event], *, max_duplicates: int = 0) -> Books:
    finals = _final_by_recipient(events)
    books = Books(results, events, _sink_copies(cluster), _failed_dsn_copies(cluster))
    c = collections.Counter[str]()
    for res in results:
        c["messages sent"] += 1
        if res.accepted:
            c["accepted (250)"] += 1
        elif res.refused:
            c["refused (4xx/5xx)"] += 1
        else:
            c["no reply (connection lost)"] += 1
        for rcpt in res.submission.recipients:
            outcomes = finals.get(rcpt, [])
            copies = books.sink_copies[rcpt]
            dsns = books.dsn_copies[rcpt]
            if res.accepted:
                c["recipients accepted"] += 1
                if not outcomes:
                    c["LOST: accepted, no final outcome"] += 1
                    books.problems.append(f"{rcpt}: accepted as {res.queue_id}, no final outcome")
                    continue
                if len(outcomes) > 1:
                    c["MORE THAN ONE final outcome"] += 1
                    books.problems.append(f"{rcpt}: final outcomes {[e.kind for e in outcomes]}")
                # The outcome must be that of the message the 250 named, not of another copy.
                others = sorted({e.message_id for e in outcomes} - {res.queue_id})
                if others:
                    c["outcome of another message id"] += 1
                    books.problems.append(f"{rcpt}: accepted as {res.queue_id!r}, outcome of {others}")
                kind = outcomes[0].kind
                c[f"final: {kind}"] += 1
                if kind == "delivered":
                    if copies == 0:
                        c["LOST: delivered event but not at the sink"] += 1
                        books.problems.append(f"{rcpt}: delivered event, sink has no copy")
                    c["duplicate copies at sinks"] += max(0, copies - 1)
                    if dsns:
                        c["delivered but also a failure DSN"] += 1
                        books.problems.append(f"{rcpt}: delivered, yet {dsns} DSNs report it failed")
                else:
                    if dsns == 0:
                        c["bounced without a DSN"] += 1
                        books.problems.append(f"{rcpt}: {kind} but no DSN reached the sender")
                    c["duplicate DSNs"] += max(0, dsns - 1)
                    if copies:
                        c["bounced but also delivered"] += 1
                        books.problems.append(f"{rcpt}: {kind} yet {copies} copies at the sink")
            elif res.refused:
                if copies or outcomes:
                    c["REFUSED but delivered/settled"] += 1
                    books.problems.append(
                        f"{rcpt}: ingress said {res.code}, yet {copies} copies, {len(outcomes)} outcomes"
                    )
            else:
                c["unknown-reply recipients delivered"] += 1 if copies else 0
    books.counts = dict(c)
    # A DSN is mail too: a delivery replica killed after sending one sends it again.
    duplicates = c["duplicate copies at sinks"] + c["duplicate DSNs"]
    if duplicates > max_duplicates:
        books.problems.append(
            f"{c['duplicate copies at sinks']} duplicate copies and {c['duplicate DSNs']} duplicate DSNs "
            f"exceed the in-flight window {max_duplicates}"
        )
    return books
