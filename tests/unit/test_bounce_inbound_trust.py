"""Inbound reports: what suppresses, which token a report is attributed to, and what a crafted
report may cost."""

from __future__ import annotations

from pytest import MonkeyPatch

from services.bounce import inbound
from services.bounce.classify import DEFAULT_RULES
from services.bounce.inbound import findings
from services.core.config import BounceConfig
from services.core.returnpath import verp_address
from tests.support.bounce_samples import arf_report, postfix_dsn

DOMAIN = "bounces.relais.test"
SECRET = "0123456789abcdef0123"
CONFIG = BounceConfig(verp=True, return_path_domain=DOMAIN, verp_secrets=[SECRET])
MESSAGE_ID = "0192a3b4c5d6e7f8091a2b3"
FBL = f"fbl@{DOMAIN}"


def rp(recipients: list[str], *, secret: str = SECRET, message_id: str = MESSAGE_ID) -> str:
    return verp_address(
        prefix="b", domain=DOMAIN, secret=secret, account="acme", message_id=message_id, recipients=recipients
    )


def test_a_remote_expiry_after_temporary_replies_does_not_suppress() -> None:
    # A remote MTA that gave up on "450 4.1.1 ... unverified address" sends "Action: failed" with
    # its last, temporary, status. Like our own expiries, that says "not now", not "never": the
    # event is due, a suppression entry is not (the synchronous path never suppresses a 4xx).
    to = rp(["later@alpha.test"])
    raw = postfix_dsn(
        to=to,
        recipient="later@alpha.test",
        status="4.1.1",
        diagnostic="450 4.1.1 <later@alpha.test>: Recipient address rejected: User unknown in relay table",
    )
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.kind == "bounced" and finding.permanent
    assert not finding.suppresses


def test_a_remote_hard_bounce_still_suppresses() -> None:
    to = rp(["gone@alpha.test"])
    raw = postfix_dsn(to=to, recipient="gone@alpha.test")
    (finding,) = findings(raw, [to], CONFIG, DEFAULT_RULES).findings
    assert finding.suppresses


def fakes(count: int) -> list[str]:
    """Return paths that look like ours but whose MAC is not: what a sender can put in headers."""
    return [
        rp(["angry@gamma.test"], secret="not-ours-at-all-0000", message_id=f"{i:023x}") for i in range(count)
    ]


def without_return_path(raw: bytes, *, above: str, below: str) -> bytes:
    """The report with its reported message's Return-Path (the FBL stripped it) replaced:
    `above` stands where the receiving MTA's trace fields stand, `below` where the sender's
    own header fields do."""
    head, sep, original = raw.partition(b"Content-Disposition: inline\r\n\r\n")
    lines = original.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path:")
    first, rest = lines[1], lines[2:]
    return head + sep + b"\r\n".join([above.encode(), first, below.encode(), *rest])


def test_a_sender_cannot_hide_its_token_behind_fake_ones() -> None:
    # The sender writes its own header fields, so it can fill them with look-alike return paths;
    # only the first 8 are checked. Those must not come before the fields the sender cannot
    # write: the report's Original-Mail-From, then the receiver's trace fields above its own.
    real = rp(["angry@gamma.test"])
    stuffed = ", ".join(f"<{f}>" for f in fakes(8))
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=real)
    raw = without_return_path(
        raw,
        above=f"Received-SPF: pass (gamma.test: domain of {real} designates 127.0.0.2 as permitted sender)",
        below=f"Sender: {stuffed}\r\nErrors-To: {stuffed}\r\nReturn-Path: {stuffed}",
    )
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert (finding.kind, finding.account, finding.message_id) == ("complained", "acme", MESSAGE_ID)
    assert finding.recipient == "angry@gamma.test" and finding.suppresses

    # Without the trace field, the report's own Original-Mail-From still names the real one.
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=real)
    raw = without_return_path(raw, above="X-Spam: no", below=f"Sender: {stuffed}")
    (finding,) = findings(raw, [FBL], CONFIG, DEFAULT_RULES).findings
    assert finding.message_id == MESSAGE_ID


def test_a_report_naming_a_crowd_costs_a_bounded_number_of_mac_checks(monkeypatch: MonkeyPatch) -> None:
    # Anyone can mail the feedback address. Every address a report names was checked against
    # every token (8 at most): 100,000 Original-Rcpt-To fields in a 4 MB report made 800,000
    # MAC checks, 3 s of CPU with the event loop blocked; a 50 MB one, about 40 s. A report about
    # one of our transactions names at most its recipients (Postfix's limit: 1,000).
    checks = 0

    def counting(*args: object) -> bool:
        nonlocal checks
        checks += 1
        return real(*args)  # type: ignore[arg-type]

    real = inbound.verify
    monkeypatch.setattr(inbound, "verify", counting)
    stuffed = "".join(f"X-Token-{i}: {fake}\r\n" for i, fake in enumerate(fakes(8)))
    crowd = "".join(f"Original-Rcpt-To: <u{i}@gamma.test>\r\n" for i in range(100_000))
    raw = arf_report(to=FBL, recipient="angry@gamma.test", return_path=rp(["angry@gamma.test"]))
    raw = raw.replace(b"Original-Rcpt-To: <angry@gamma.test>\r\n", crowd.encode())
    raw = raw.replace(b"Subject: Hello\r\n", f"Subject: Hello\r\n{stuffed}".encode())

    verdict = findings(raw, [FBL], CONFIG, DEFAULT_RULES)

    assert verdict.findings == []
    assert 0 < checks <= 8 * 1_000
