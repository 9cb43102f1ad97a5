"""DSN (RFC 3461): advertised on submission; RET/ENVID/NOTIFY/ORCPT recorded for the bounce service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.ingress.dsn import BAD_DSN_PARAMETER
from tests.integration.ingress.helpers import client, in_thread, login, queued, reply
from tests.support.relais import message


async def test_dsn_parameters_recorded(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def scenario() -> tuple[bool, list[tuple[int, bytes]]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            replies = [
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET=ALL"),
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET=HDRS ENVID=campaign+2B42"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> NOTIFY=NEVER,DELAY"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+40alpha.test"),
                smtp.docmd("RCPT", "TO:<b@alpha.test>"),
            ]
            replies.append(smtp.data(message()))
            return smtp.has_extn("dsn"), replies

    advertised, replies = await in_thread(scenario)
    assert advertised
    assert replies[0] == reply(BAD_DSN_PARAMETER) and replies[2] == reply(BAD_DSN_PARAMETER)
    assert [r[0] for r in (replies[1], replies[3], replies[4], replies[5])] == [250, 250, 250, 250]
    [env] = await queued(ingress.config.nats.url)
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "campaign+42")
    assert env.recipients == ("a@alpha.test", "b@alpha.test")
    assert env.dsn_notify == {"a@alpha.test": "SUCCESS,FAILURE"}
    assert env.dsn_orcpt == {"a@alpha.test": "rfc822;A@alpha.test"}


# Values holding '>' (an ENVID written as a Message-ID) and parameters after a path without
# angle brackets: split off at the path's real end, not its last '>' (before, MAIL got 555).
async def test_an_envid_holding_angle_brackets_is_recorded(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            replies = [
                smtp.docmd("MAIL", "FROM:news@acme.test RET=HDRS"),
                smtp.rset(),
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET=HDRS ENVID=<4711@client.test>"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> NOTIFY=FAILURE ORCPT=rfc822;<a@alpha.test>"),
            ]
            return [*replies, smtp.data(message())]

    replies = await in_thread(scenario)
    assert [code for code, _ in replies] == [250, 250, 250, 250, 250], replies
    [env] = await queued(ingress.config.nats.url)
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "<4711@client.test>")
    assert env.dsn_notify == {"a@alpha.test": "FAILURE"}
    assert env.dsn_orcpt == {"a@alpha.test": "rfc822;<a@alpha.test>"}


# RFC 3461 gives each parameter a value and takes it once: "RET=" and a RET, ENVID, NOTIFY or
# ORCPT repeated are refused, as in Postfix. Before, "RET=" was taken as no RET and of a repeated
# one the last won: the DSN would carry another ENVID than the client's first, silently.
async def test_empty_or_repeated_dsn_parameters_are_refused(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            replies = [
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET="),
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET=FULL RET=HDRS"),
                smtp.docmd("MAIL", "FROM:<news@acme.test> ENVID=first ENVID=second"),
                smtp.docmd("MAIL", "FROM:<news@acme.test> RET=HDRS ENVID=first"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> NOTIFY=FAILURE NOTIFY=NEVER"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> ORCPT=rfc822;a+40alpha.test ORCPT=rfc822;b+40x.test"),
                smtp.docmd("RCPT", "TO:<a@alpha.test> NOTIFY=FAILURE ORCPT=rfc822;a+40alpha.test"),
            ]
            return [*replies, smtp.data(message())]

    replies = await in_thread(scenario)
    refused = [replies[i] for i in (0, 1, 2, 4, 5)]
    assert refused == [reply(BAD_DSN_PARAMETER)] * 5, replies
    assert [code for code, _ in (replies[3], replies[6], replies[7])] == [250, 250, 250], replies
    [env] = await queued(ingress.config.nats.url)
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "first")
    assert env.dsn_notify == {"a@alpha.test": "FAILURE"}
    assert env.dsn_orcpt == {"a@alpha.test": "rfc822;a@alpha.test"}
