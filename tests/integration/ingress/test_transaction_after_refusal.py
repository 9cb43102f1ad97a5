"""A transaction refused (452 for a recipient over the limit, then 552 for its message) leaves
nothing behind in the session: the next one has only its own recipients, DSN parameters and
recipient count (RFC 5321 4.1.1.4: the end of the data ends the transaction either way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.ingress.replies import MESSAGE_TOO_BIG, TOO_MANY_RECIPIENTS
from tests.integration.ingress.helpers import client, in_thread, login, queued, reply
from tests.support.relais import message

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 12  # ~12 KB


async def test_the_transaction_after_a_refused_one_starts_clean(make_ingress: Callable[..., Any]) -> None:
    stack = await make_ingress(ingress={"max_message_size": 10_000, "max_recipients": 2})

    def scenario() -> list[tuple[int, bytes]]:
        with client(stack.smtp_address) as smtp:
            login(smtp)
            smtp.mail("news@acme.test", ["RET=HDRS", "ENVID=first"])
            got = [smtp.rcpt(f"r{i}@alpha.test", ["NOTIFY=NEVER"]) for i in range(3)]
            got.append(smtp.data(BIG))
            # r0 again: not a duplicate of the refused transaction's, nor under its NOTIFY.
            smtp.mail("news@acme.test")
            got += [smtp.rcpt("r0@alpha.test"), smtp.rcpt("c@alpha.test")]
            got.append(smtp.data(message()))
            return got

    got = await in_thread(scenario)
    assert [code for code, _ in got[:2]] == [250, 250], got
    assert got[2] == reply(TOO_MANY_RECIPIENTS) and got[3] == reply(MESSAGE_TOO_BIG), got
    assert [code for code, _ in got[4:]] == [250, 250, 250], got
    [env] = await queued(stack.config.nats.url)
    assert env.recipients == ("r0@alpha.test", "c@alpha.test")
    assert (env.dsn_ret, env.dsn_envid, env.dsn_notify) == ("", "", {})
