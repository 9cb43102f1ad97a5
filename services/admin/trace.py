"""`relais trace <message-id>`: the span tree of one message from the local JSON-lines trace file.

`relais up` exports spans to `relais-data/traces.jsonl` (see `telemetry.JsonLinesExporter`),
so a newcomer sees what an operator sees in Jaeger without installing one. Pure functions over
span records; the CLI reads the file(s) and prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from services.core import telemetry as t

# Shown after each span's name, in this order, when present.
KEY_ATTRIBUTES = (
    t.MESSAGE_ID,
    t.DSN_FOR,
    t.ACCOUNT,
    t.POOL,
    t.SITE,
    t.MX_HOST,
    t.SOURCE_IP,
    t.ATTEMPT,
    t.OUTCOME,
    t.REPLY_CODE,
    t.ENHANCED_STATUS,
    t.TLS_VERSION,
    t.BOUNCE_CATEGORY,
)

Span = dict[str, Any]


def trace_files(path: str | Path) -> list[Path]:
    """The trace file and its rotated predecessor, oldest first."""
    path = Path(path)
    return [p for p in (path.with_name(path.name + ".1"), path) if p.exists()]


def load_spans(paths: Iterable[Path]) -> list[Span]:
    """The span records of the files; raises OSError for a path that cannot be read (a
    directory, no permission). A line that is no span record is skipped, as is one of bytes
    that are no text: the exporter writes ASCII, so such a file is another one (`--file` wrong)."""
    spans: list[Span] = []
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash; the rest is still readable
                if isinstance(record, dict):
                    spans.append(record)
    return spans


def trace_ids_for(spans: Sequence[Span], message_id: str) -> list[str]:
    """Traces that carry the message (or a DSN about it, or a trace id given directly)."""
    found: list[str] = []
    for span in spans:
        attrs = span.get("attributes") or {}
        if message_id in (attrs.get(t.MESSAGE_ID), attrs.get(t.DSN_FOR), span.get("trace_id")):
            if span["trace_id"] not in found:
                found.append(span["trace_id"])
    return found


def _short_service(name: str) -> str:
    return name.removeprefix("relais-")


def _duration_ms(span: Span) -> float:
    if span.get("start") is None or span.get("end") is None:
        return 0.0
    return (span["end"] - span["start"]) / 1e6


def describe(span: Span) -> str:
    attrs = span.get("attributes") or {}
    facts = [f"{t.label(k)}={attrs[k]}" for k in KEY_ATTRIBUTES if attrs.get(k) not in (None, "")]
    status = "  ERROR" if span.get("status") == "ERROR" else ""
    return (
        f"{span['name']}  [{_short_service(span.get('service', ''))}]  {_duration_ms(span):.1f} ms"
        f"{status}  {' '.join(facts)}".rstrip()
    )


def render_tree(spans: Sequence[Span]) -> str:
    """One trace as an indented tree; spans whose parent is missing are shown as roots."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for span in spans:
        parent = span.get("parent_id") or ""
        if parent and parent in by_id:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    lines: list[str] = []
    t0 = min((s.get("start") or 0 for s in spans), default=0)

    def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
        offset = ((span.get("start") or t0) - t0) / 1e9
        branch = "" if top else ("└─ " if last else "├─ ")
        lines.append(f"+{offset:8.3f}s  {prefix}{branch}{describe(span)}")
        for event in span.get("events") or []:
            if event.get("name", "").startswith("relais."):
                ev_attrs = event.get("attributes") or {}
                reply = " ".join(
                    str(ev_attrs[k]) for k in (t.REPLY_CODE, t.ENHANCED_STATUS) if ev_attrs.get(k)
                )
                rcpts = str(ev_attrs.get(t.RECIPIENTS, ""))
                unnamed = int(ev_attrs.get(t.RECIPIENT_COUNT) or 0) - t.RECIPIENTS_NAMED
                if unnamed > 0:
                    rcpts += f" (+{unnamed} more)"
                said = f'  "{ev_attrs[t.REPLY_TEXT]}"' if ev_attrs.get(t.REPLY_TEXT) else ""
                pad = prefix + ("" if top else ("   " if last else "│  "))
                lines.append(
                    f"{'':11}{pad}  • {event['name'].removeprefix('relais.')} {reply} {rcpts}".rstrip() + said
                )
        kids = sorted(children.get(span["span_id"], []), key=lambda s: s.get("start") or 0)
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("   " if last else "│  ")), i == len(kids) - 1, False)

    for root in sorted(roots, key=lambda s: s.get("start") or 0):
        walk(root, "", True, True)
    return "\n".join(lines)


def render_message(spans: Sequence[Span], message_id: str) -> str | None:
    """Every trace of a message, rendered; None when the file holds none."""
    ids = trace_ids_for(spans, message_id)
    if not ids:
        return None
    out = []
    for trace_id in ids:
        members = [s for s in spans if s["trace_id"] == trace_id]
        services = sorted({_short_service(s.get("service", "")) for s in members})
        out.append(f"trace {trace_id}  ({len(members)} spans; {', '.join(services)})")
        out.append(render_tree(members))
    return "\n".join(out)
