"""Reply text with octets that are not UTF-8 (tests/integration/bounce/test_dsn_undecodable_reply.py
has the scenario): censored to "?", so that every envelope, notice and retry can carry it."""

from services.core.envelope import BounceNotice
from services.core.outcome import Bounced, Reply
from tests.support.relais import an_envelope

# As aiosmtplib decodes b"Empf\xe4nger": a lone surrogate for the octet that is not UTF-8.
UNDECODABLE = b"Empf\xe4nger unbekannt".decode("utf-8", "surrogateescape")


def test_undecodable_octets_of_any_reply_are_censored() -> None:
    assert Reply.parse(550, f"5.1.1 {UNDECODABLE}").text == "Empf?nger unbekannt"
    assert Reply(421, "4.4.1", f"greeting: {UNDECODABLE}").text == "greeting: Empf?nger unbekannt"


def test_utf8_reply_text_is_kept() -> None:
    assert Reply.parse(550, "5.1.1 Empfänger unbekannt").text == "Empfänger unbekannt"


def test_a_notice_with_such_a_reply_round_trips() -> None:
    failure = Bounced("gone@alpha.test", Reply.parse(550, f"5.1.1 {UNDECODABLE}", "RCPT"), "mx.alpha.test")
    notice = BounceNotice(envelope=an_envelope("gone@alpha.test"), failures=(failure,))
    assert BounceNotice.from_msgpack(notice.to_msgpack()).failures == (failure,)
