"""Pure routing decisions: split a message by recipient domain, choose its pool."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.config import Config
from services.core.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery job: the recipients of one domain, with a stable id for dedupe and body refs."""

    job_id: str
    domain: str
    recipients: tuple[str, ...]


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def split_by_domain(env: Envelope) -> list[Job]:
    """Jobs in a deterministic order, so a redelivered message yields the same job ids.

    A re-routed job (a retry) already has its id and a single domain; it stays one job.
    """
    groups: dict[str, list[str]] = {}
    for rcpt in env.recipients:
        groups.setdefault(recipient_domain(rcpt), []).append(rcpt)
    if env.job_id:
        return [Job(env.job_id, domain, tuple(rcpts)) for domain, rcpts in groups.items()]
    return [Job(f"{env.id}-{i}", domain, tuple(groups[domain])) for i, domain in enumerate(sorted(groups))]


def choose_pool(config: Config, env: Envelope) -> str:
    """Sender domain's dedicated pool first, then the account's default pool."""
    return config.pool_for(env.sender_domain, env.account)
