"""Replies and outcomes: what a server's answer means for a recipient."""

from __future__ import annotations

import pytest

from services.core.outcome import Bounced, Deferred, Delivered, Reply, outcome_for


@pytest.mark.parametrize(
    ("code", "text", "enhanced", "rest"),
    [
        (550, "5.1.1 <bob@x.test>: user unknown", "5.1.1", "<bob@x.test>: user unknown"),
        (451, "4.7.1 Try again later", "4.7.1", "Try again later"),
        (250, "2.0.0 Ok: queued as X", "2.0.0", "Ok: queued as X"),
        (554, "Transaction failed", "5.0.0", "Transaction failed"),
        (421, "Service not available", "4.0.0", "Service not available"),
        # An enhanced code whose class disagrees with the reply code is text, not status.
        (550, "4.2.2 odd server", "5.0.0", "4.2.2 odd server"),
    ],
)
def test_parse_splits_enhanced_status(code: int, text: str, enhanced: str, rest: str) -> None:
    reply = Reply.parse(code, text, "RCPT")
    assert (reply.enhanced_status, reply.text, reply.command) == (enhanced, rest, "RCPT")


@pytest.mark.parametrize(
    ("code", "kind"),
    [(250, Delivered), (251, Delivered), (450, Deferred), (421, Deferred), (550, Bounced), (554, Bounced)],
)
def test_outcome_for_reply_class(code: int, kind: type) -> None:
    assert isinstance(outcome_for("a@x.test", Reply.parse(code, "text")), kind)


def test_reply_dict_round_trip() -> None:
    reply = Reply(452, "4.5.3", "Too many recipients", "RCPT")
    assert Reply.from_dict(reply.to_dict()) == reply
