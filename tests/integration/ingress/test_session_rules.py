"""Session-level rules: no TLS inside TLS, a bound on commands that do no work, and every 421
counted as a rejection whichever way it is written."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from typing import Any

from services.core import metrics
from services.core.config import ListenerConfig
from services.ingress.protocol import JUNK_COMMAND_LIMIT
from services.ingress.replies import (
    TLS_ALREADY_ACTIVE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK_COMMANDS,
)
from tests.integration.ingress.helpers import (
    client,
    free_listen,
    hung_up,
    in_thread,
    listener,
    login,
    reply,
    tls_sections,
)
from tests.support.certs import TestPKI
from tests.support.relais import message


def _rejected(verdict_text: str) -> float:
    reason = " ".join(verdict_text.split()[:2])
    return metrics.REGISTRY.get_sample_value("relais_rejected_total", {"reason": reason}) or 0.0


async def test_starttls_inside_tls_is_refused(make_ingress: Callable[..., Any], pki: TestPKI) -> None:
    starttls, implicit = free_listen(), free_listen()
    listeners = [ListenerConfig(listen=starttls), ListenerConfig(listen=implicit, mode="implicit-tls")]
    ingress = await make_ingress(ingress=tls_sections(pki, listeners=listeners))

    def scenario() -> list[tuple[int, bytes]]:
        with client(listener(ingress, starttls), pki=pki, starttls=True) as smtp:
            again = smtp.docmd("STARTTLS")
            still = smtp.noop()  # the same TLS session goes on
        host, port = listener(ingress, implicit)
        with smtplib.SMTP_SSL(host, port, context=pki.client_context(), timeout=15) as smtp:
            smtp.ehlo("client.test")
            return [again, still, smtp.docmd("STARTTLS")]

    again, still, implicit_again = await in_thread(scenario)
    assert again == reply(TLS_ALREADY_ACTIVE) and still[0] == 250
    assert implicit_again == reply(TLS_ALREADY_ACTIVE)


async def test_commands_that_do_no_work_are_limited(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress()

    def scenario() -> tuple[list[int], tuple[int, bytes], bool]:
        with client(ingress.smtp_address) as smtp:
            login(smtp)
            # An accepted message starts the count afresh: a long session that sends is no junk.
            smtp.sendmail("news@acme.test", ["a@alpha.test"], message())
            codes = [
                smtp.docmd(cmd)[0] for cmd in ("NOOP", "RSET", "HELP", "VRFY x@y.test", "EHLO c.test") * 20
            ]
            smtp.sendmail("news@acme.test", ["a@alpha.test"], message())
            codes += [smtp.noop()[0] for _ in range(JUNK_COMMAND_LIMIT)]
            last = smtp.noop()
            closed = hung_up(smtp)
            return codes, last, closed

    codes, last, closed = await in_thread(scenario)
    assert all(200 <= code < 300 for code in codes), codes
    assert last == reply(TOO_MANY_JUNK_COMMANDS) and closed


def _raw_exchange(address: tuple[str, int], commands: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(commands)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


async def test_every_421_counts_as_a_rejection(make_ingress: Callable[..., Any]) -> None:
    ingress = await make_ingress(ingress={"max_errors": 2, "max_connections_per_ip": 1})
    address = ingress.smtp_address
    before = _rejected(str(TOO_MANY_ERRORS))
    # Written past `push`: the error limit's 421 ...
    data = await in_thread(_raw_exchange, address, b"EHLO c.test\r\nBOGUS\r\nBOGUS\r\n")
    assert data.rstrip().endswith(str(TOO_MANY_ERRORS).encode()), data
    # ... and the connection limit's, before any SMTP state exists.
    data = await in_thread(_second_connection, address)
    assert data == f"{TOO_MANY_CONNECTIONS}\r\n".encode()
    assert _rejected(str(TOO_MANY_ERRORS)) == before + 2


def _second_connection(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=10) as first:
        assert first.recv(200).startswith(b"220")
        return _raw_exchange(address, b"")
