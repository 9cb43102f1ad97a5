"""ARF feedback-loop reports (RFC 5965): a recipient pressed "this is spam". No I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

from services.bounce.parse import MAX_FIELD, header_text, part_as_message, returned_message

# Feedback types that mean "the recipient does not want this mail" (RFC 5965 section 7.3);
# "not-spam" is the opposite and "virus" is about the content, not the recipient's wishes.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "other"})
_MAX_PARTS_SEARCHED = 16


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    feedback_type: str
    user_agent: str = ""
    original_mail_from: str = ""
    original_rcpt_to: list[str] = field(default_factory=list)
    source_ip: str = ""
    arrival_date: str = ""
    reporting_mta: str = ""
    # The reported message (full or headers only): its Return-Path carries our VERP token.
    original: Message | None = None

    @property
    def is_complaint(self) -> bool:
        return self.feedback_type in COMPLAINT_TYPES


def is_arf(msg: Message) -> bool:
    if msg.get_content_type() != "multipart/report":
        return False
    return str(msg.get_param("report-type", "", header="content-type")).lower() == "feedback-report"


def parse_arf(msg: Message) -> FeedbackReport | None:
    msg = feedback_report(msg)
    if msg is None:
        return None
    fields = _report_fields(msg)
    if fields is None:
        return None
    rcpts = [_bare(v) for v in fields.get_all("Original-Rcpt-To", []) if _bare(v)]
    return FeedbackReport(
        feedback_type=str(fields.get("Feedback-Type", "")).strip().lower(),
        user_agent=header_text(fields.get("User-Agent", "")).strip()[:MAX_FIELD],
        original_mail_from=_bare(fields.get("Original-Mail-From", "")),
        original_rcpt_to=rcpts,
        source_ip=str(fields.get("Source-IP", "")).strip(),
        arrival_date=str(fields.get("Arrival-Date", "") or fields.get("Received-Date", "")).strip(),
        reporting_mta=str(fields.get("Reporting-MTA", "")).partition(";")[2].strip(),
        original=returned_message(msg),
    )


def feedback_report(msg: Message) -> Message | None:
    """The ARF report `msg` is, or the first one forwarded inside it: some feedback loops and
    abuse desks send it as a part of a multipart/mixed, or attached as message/rfc822. Only the
    first parts are looked at; a report nested deeper is not one a feedback loop sends."""
    for seen, part in enumerate(_forwarded_parts(msg)):
        if seen >= _MAX_PARTS_SEARCHED:
            return None
        if is_arf(part):
            return part
    return None


def _forwarded_parts(msg: Message) -> Iterator[Message]:
    """`msg.walk()`, but not into a report of another kind: a DSN (or read receipt) returns the
    message it is about, and an ARF report returned in a bounce is mail we sent (an account that
    sends reports), not one sent to us. Read as one, it named its complainer as ours."""
    yield msg
    if msg.get_content_type() == "multipart/report" and not is_arf(msg):
        return
    if msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                yield from _forwarded_parts(sub)


def _report_fields(msg: Message) -> Message | None:
    # The stdlib parses message/* subtypes as an embedded message: the fields are its headers.
    return part_as_message(msg, ("message/feedback-report",))


def _bare(value: object) -> str:
    text = header_text(value).strip()
    if ";" in text and "@" not in text.partition(";")[0]:
        text = text.partition(";")[2]
    return text.strip().strip("<>").strip()
