"""Recipients past the per-message limit (RFC 5321 4.5.3.1.10): a client that pipelines more of
them than the limit gets 452 for the excess and sends the message to the ones accepted, as it
does with Postfix (`smtpd_recipient_overshoot_limit`), instead of being disconnected as if each
excess recipient were an error. A recipient given twice is one RCPT more, as in Postfix, so
repeating it cannot hold a session open for ever."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from services.ingress.protocol import RECIPIENT_OVERSHOOT_LIMIT
from services.ingress.replies import TOO_MANY_ERRORS, TOO_MANY_RECIPIENTS
from tests.integration.ingress.helpers import ehlo_auth, in_thread, queued, read_replies
from tests.support.relais import message

MAIL = b"MAIL FROM:<news@acme.test>\r\n"


def _rcpts(count: int) -> bytes:
    return b"".join(b"RCPT TO:<r%d@alpha.test>\r\n" % n for n in range(count))


def _pipelined(address: tuple[str, int], commands: bytes, then: bytes = b"", *, more: int = 0) -> list[bytes]:
    """The last line of every reply to `commands` (greeting, EHLO and AUTH first), sent in one
    write, and `more` replies after them (a 421 closing the session comes in a write of its own);
    then, once the 354 is in, `then` and the replies to it (or fewer if the server closes)."""
    with socket.create_connection(address, timeout=15) as sock:
        sock.sendall(ehlo_auth() + commands)
        replies = read_replies(sock, 3 + commands.count(b"\r\n") + more)
        if then and replies and replies[-1].startswith(b"354"):
            sock.sendall(then)
            replies += read_replies(sock, then.count(b"\r\n.\r\n") + then.endswith(b"QUIT\r\n"))
        return replies


async def test_a_client_pipelining_more_recipients_than_the_limit_still_sends_to_the_rest(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress(ingress={"max_recipients": 3, "max_errors": 10})
    body = message().replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n"
    # 15 recipients for a limit of 3: 12 excess, more than the session's 10 errors.
    replies = await in_thread(_pipelined, ingress.smtp_address, MAIL + _rcpts(15) + b"DATA\r\n", body)
    over = str(TOO_MANY_RECIPIENTS).encode()
    assert replies[3:7] == [b"250 2.1.0 Ok"] + [b"250 2.1.5 Ok"] * 3, replies
    assert replies[7:19] == [over] * 12, replies
    assert replies[19].startswith(b"354") and replies[20].startswith(b"250 2.0.0 Ok: queued"), replies
    assert replies[21].startswith(b"221"), replies
    [env] = await queued(ingress.config.nats.url)
    assert env.recipients == ("r0@alpha.test", "r1@alpha.test", "r2@alpha.test")


async def test_excess_recipients_beyond_the_overshoot_limit_are_errors(
    make_ingress: Callable[..., Any],
) -> None:
    ingress = await make_ingress(ingress={"max_recipients": 1, "max_errors": 3})
    excess = RECIPIENT_OVERSHOOT_LIMIT + 3
    replies = await in_thread(_pipelined, ingress.smtp_address, MAIL + _rcpts(1 + excess), more=1)
    over = str(TOO_MANY_RECIPIENTS).encode()
    assert replies[4] == b"250 2.1.5 Ok" and replies[5:-1] == [over] * excess, replies[-5:]
    assert replies[-1] == str(TOO_MANY_ERRORS).encode(), replies[-5:]


async def test_a_repeated_recipient_counts_against_the_limit(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_recipients": 3})
    repeated = b"RCPT TO:<bob@alpha.test>\r\n" * 3 + b"RCPT TO:<bob@ALPHA.test>\r\n"
    body = message().replace(b"\r\n.", b"\r\n..") + b".\r\n"
    replies = await in_thread(_pipelined, ingress.smtp_address, MAIL + repeated + b"DATA\r\n", body)
    assert replies[4:7] == [b"250 2.1.5 Ok"] * 3, replies
    assert replies[7] == str(TOO_MANY_RECIPIENTS).encode(), replies
    assert replies[9].startswith(b"250 2.0.0 Ok: queued"), replies
    [env] = await queued(ingress.config.nats.url)
    assert env.recipients == ("bob@alpha.test",)
