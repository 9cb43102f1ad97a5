"""A SIZE parameter that is not ASCII digits is a 501 syntax error however it is written: last of
several, or glued to the closing '>'. aiosmtpd takes the last SIZE and calls int() on anything
str.isdigit() accepts ("²"), which answered 451 with a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.ingress.helpers import in_thread, reply_after_auth


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM:<news@acme.test> SIZE=10 SIZE=\u00b2",
        "MAIL FROM:<news@acme.test>SIZE=\u00b2",
    ],
    ids=["second-size", "glued-to-path"],
)
async def test_non_ascii_size_still_reaches_int(
    make_ingress: Callable[..., Any], caplog: Any, line: str
) -> None:
    stack = await make_ingress(ingress={"max_message_size": 0})
    caplog.set_level(logging.ERROR)
    said = await in_thread(reply_after_auth, stack.smtp_address, line)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert said.startswith(b"501") and not tracebacks, (said, [r.getMessage() for r in tracebacks])
