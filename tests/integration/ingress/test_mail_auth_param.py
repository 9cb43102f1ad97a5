"""The AUTH parameter of MAIL FROM (RFC 4954 5): sendmail, Exchange and Exim acting as clients
send `AUTH=<>` or `AUTH=<xtext of the submitter>` to a server that advertises AUTH. RFC 4954 lets
a server treat every client as insufficiently trusted, but it must then "parse and discard
syntactically valid AUTH parameters", as Postfix does: refusing them with 555 refused every
message such a client relayed. Where AUTH is not offered (the inbound listener) it stays 555."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

from services.ingress.replies import BAD_AUTH_PARAMETER
from tests.integration.ingress.helpers import client, in_thread, listening, login, queued, reply
from tests.support.relais import message


async def test_a_valid_auth_parameter_is_taken_and_discarded(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            replies = [smtp.docmd("MAIL", "FROM:<news@acme.test> AUTH=news+2Bx@acme.test")]
            replies += [smtp.rset(), smtp.docmd("MAIL", "FROM:<news@acme.test> AUTH=+zz")]
            replies += [smtp.docmd("MAIL", "FROM:<news@acme.test> SIZE=100 auth=<>")]
            replies.append(smtp.rcpt("a@alpha.test"))
            try:
                replies.append(smtp.data(message()))
            except smtplib.SMTPResponseException as refused:
                replies.append((refused.smtp_code, refused.smtp_error))
            return replies

    replies = await in_thread(scenario)
    assert replies[2] == reply(BAD_AUTH_PARAMETER), replies
    assert [code for code, _ in replies] == [250, 250, 501, 250, 250, 250], replies
    [env] = await queued(ingress.config.nats.url)
    assert env.sender == "news@acme.test"


async def test_where_auth_is_not_offered_the_parameter_is_refused(make_ingress: Callable[..., Any]) -> None:
    _, [inbound] = await listening(
        make_ingress, {"local_domains": ["bounces.relais.test"]}, {"mode": "inbound"}
    )

    def scenario() -> tuple[int, bytes]:
        with client(inbound) as smtp:
            return smtp.docmd("MAIL", "FROM:<someone@other.test> AUTH=<>")

    code, _ = await in_thread(scenario)
    assert code == 555
