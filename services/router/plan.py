"""Pure routing decisions: split a message by recipient domain, choose its pool, drop suppressed."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from services.core.addresses import domain_as_written, domain_key, domain_of, recipient_key
from services.core.config import AccountConfig, Config
from services.core.envelope import META_POOL, Envelope, job_key


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery job: the recipients of one domain, with a stable id for dedupe and body refs."""

    job_id: str
    domain: str
    recipients: tuple[str, ...]


def split_by_domain(env: Envelope) -> list[Job]:
    """Jobs in a deterministic order, so a redelivered message yields the same job ids.

    A re-routed job (a retry) already has its id and a single domain; it stays one job.
    """
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for rcpt in env.recipients:
        group = groups.setdefault(domain_of(rcpt), [])
        key = recipient_key(rcpt)
        if key not in seen:  # a duplicate would get two RCPTs, two events, two DSN entries
            seen.add(key)
            group.append(rcpt)
    if env.job_id:
        return [Job(env.job_id, domain, tuple(rcpts)) for domain, rcpts in groups.items()]
    # Numbered in the order of the domains as written (lower-cased), as releases before
    # domain_key numbered them: a message re-routed by a newer router, after an older one
    # stored some of its jobs, must give each domain the id it got then, or a job would be
    # taken for a duplicate of another domain's and dropped.
    order = sorted(groups, key=lambda domain: domain_as_written(groups[domain][0]))
    return [Job(job_key(env.id, i), domain, tuple(groups[domain])) for i, domain in enumerate(order)]


def choose_pool(config: Config, env: Envelope, account: AccountConfig | None) -> str:
    """A dedicated sender-domain pool always wins (it never leaks onto other IPs, whatever the
    message asks); then a per-message pool the account may use; then the account's default."""
    # Envelopes queued before the ingress stored A-labels may carry the U-label spelling.
    dedicated = config.sender_domains.get(domain_key(env.sender_domain))
    if dedicated:
        return dedicated
    if account is None:
        return "default"
    requested = env.meta.get(META_POOL, "")
    # Checked again here although the ingress checked it: a pool is a reputation boundary.
    if requested and requested in config.pools and requested in {account.pool, *account.pools}:
        return requested
    return account.pool if account.pool in config.pools else "default"


def without_suppressed(job: Job, suppressed: Collection[str]) -> tuple[Job, tuple[str, ...]]:
    """The job restricted to recipients not suppressed, and the suppressed ones.

    The job keeps its id even when some recipients go: ids were fixed (and the body held for
    them) before suppression was looked at, so a changing list cannot shift them.
    """
    if not suppressed:
        return job, ()
    kept = tuple(r for r in job.recipients if r.lower() not in suppressed)
    dropped = tuple(r for r in job.recipients if r.lower() in suppressed)
    return Job(job.job_id, job.domain, kept), dropped
