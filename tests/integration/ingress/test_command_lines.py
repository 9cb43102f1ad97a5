"""Command-line length limits: per session, with what each advertised extension adds."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import client, in_thread, login
from tests.support.relais import message

LONG_DOMAIN = ".".join(["d" * 60] * 4) + ".test"  # 249 octets
TOO_LONG = (500, b"5.5.2 Command line too long")


async def test_one_session_s_ehlo_does_not_change_another_s_limits(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    # 530 octets: over RFC 5321's 512, within what SIZE and SMTPUTF8 add.
    mail = f"FROM:<{'x' * 60}@{LONG_DOMAIN}> RET=HDRS ENVID={'e' * 100} SIZE=1000 SMTPUTF8" + " " * 61

    def scenario() -> list[tuple[int, bytes]]:
        with client(ingress.smtp_address) as first:
            answers = [first.docmd("MAIL", mail)]
            with smtplib.SMTP(*ingress.smtp_address, timeout=15):  # another session, no EHLO yet
                answers.append(first.docmd("MAIL", mail))
            return answers

    alone, after_another = await in_thread(scenario)
    assert len(f"MAIL {mail}") > 512
    assert alone != TOO_LONG and after_another == alone


async def test_rcpt_may_carry_a_long_orcpt(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()
    orcpt = f"rfc822;{'x' * 60}@{LONG_DOMAIN}"  # RFC 3461 allows 500 octets

    def scenario() -> tuple[int, bytes]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test")
            answer = smtp.docmd("RCPT", f"TO:<a@alpha.test> NOTIFY=FAILURE ORCPT={orcpt}" + " " * 200)
            smtp.data(message())
            return answer

    answer = await in_thread(scenario)
    assert answer[0] == 250, answer
