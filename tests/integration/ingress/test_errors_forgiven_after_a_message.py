"""The errors-per-session limit counts errors made without delivering mail, as Postfix's
smtpd_hard_error_limit does: an accepted message forgives the errors before it. A long session
of a bulk sender, one bad recipient now and then, is no client gone astray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.ingress.replies import BAD_RECIPIENT_SYNTAX, TOO_MANY_ERRORS
from tests.integration.ingress.helpers import client, hung_up, in_thread, login, queued, reply
from tests.support.relais import message

MAX_ERRORS = 3


async def test_an_accepted_message_forgives_the_errors_before_it(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_errors": MAX_ERRORS})

    def scenario() -> tuple[list[tuple[int, bytes]], list[int]]:
        refused, accepted = [], []
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            # Each message has MAX_ERRORS - 1 bad recipients among good ones: more errors in the
            # session than the limit, never that many between two accepted messages.
            for _ in range(MAX_ERRORS + 1):
                smtp.mail("news@acme.test")
                refused += [smtp.rcpt("a@alpha") for _ in range(MAX_ERRORS - 1)]
                smtp.rcpt("a@alpha.test")
                accepted.append(smtp.data(message())[0])
        return refused, accepted

    refused, accepted = await in_thread(scenario)
    assert refused == [reply(BAD_RECIPIENT_SYNTAX)] * ((MAX_ERRORS - 1) * (MAX_ERRORS + 1))
    assert accepted == [250] * (MAX_ERRORS + 1)
    assert len(await queued(ingress.config.nats.url)) == MAX_ERRORS + 1


async def test_errors_without_a_message_still_end_the_session(make_ingress: Callable[..., Any]) -> None:
    # A refused message forgives nothing: the limit still ends a session that only errs.
    ingress = await make_ingress(ingress={"max_errors": MAX_ERRORS})

    def scenario() -> tuple[list[int], tuple[int, bytes], bool]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            smtp.rcpt("a@alpha.test")
            codes = [smtp.data(b"Subject: x\r\n\r\n\0\r\n")[0]]  # a NUL: refused
            codes += [smtp.mail("other@elsewhere.test")[0] for _ in range(MAX_ERRORS - 1)]
            last = smtp.noop()  # answered by the 421 sent after the last error
            closed = hung_up(smtp)
            return codes, last, closed

    codes, last, closed = await in_thread(scenario)
    assert codes == [554] + [553] * (MAX_ERRORS - 1)
    assert last == reply(TOO_MANY_ERRORS) and closed
