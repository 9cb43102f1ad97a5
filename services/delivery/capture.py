"""Laptop mode: "deliver" into a local mailbox folder instead of the internet.

Each delivered job becomes `<job>.eml` (the exact bytes a remote MX would have received) and
`<job>.json` (envelope facts); `relais mailbox` lists and shows them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from services.core.envelope import Envelope
from services.core.outcome import LOCAL_MAILBOX, Delivered, Outcome, Reply

CAPTURED = Reply(250, "2.0.0", "Captured in the local mailbox", "DATA")


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    job_id: str
    message_id: str
    sender: str
    recipients: list[str]
    size: int
    at: float
    path: Path


def capture(mailbox: Path, env: Envelope, body: bytes) -> list[Outcome]:
    mailbox.mkdir(parents=True, exist_ok=True)
    eml = mailbox / f"{env.key}.eml"
    tmp = eml.with_suffix(".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, eml)  # atomic: a reader never sees half a message
    meta = {
        "job_id": env.key,
        "message_id": env.id,
        "sender": env.sender,
        "recipients": list(env.recipients),
        "size": len(body),
        "at": time.time(),
    }
    (mailbox / f"{env.key}.json").write_text(json.dumps(meta))
    return [Delivered(r, CAPTURED, LOCAL_MAILBOX) for r in env.recipients]


def list_captured(mailbox: Path) -> list[CapturedMessage]:
    out = []
    for meta_path in sorted(mailbox.glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        out.append(
            CapturedMessage(
                job_id=meta["job_id"],
                message_id=meta["message_id"],
                sender=meta["sender"],
                recipients=meta["recipients"],
                size=meta["size"],
                at=meta["at"],
                path=meta_path.with_suffix(".eml"),
            )
        )
    return sorted(out, key=lambda m: m.at)
