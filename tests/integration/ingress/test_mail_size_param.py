"""MAIL FROM with SIZE= made of a Unicode digit that int() refuses ("²") is a syntax error: aiosmtpd
calls int() on anything str.isdigit() accepts whenever data_size_limit is set (always, since
max_message_size = 0 means the DATA budget), which answered 451 with a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tests.integration.ingress.helpers import in_thread, reply_after_auth


async def test_size_with_a_superscript_digit(make_ingress: Callable[..., Any], caplog: Any) -> None:
    stack = await make_ingress(ingress={"max_message_size": 0})
    caplog.set_level(logging.ERROR)
    said = await in_thread(reply_after_auth, stack.smtp_address, "MAIL FROM:<news@acme.test> SIZE=\u00b2")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert said.startswith(b"501 5.5.4") and not tracebacks, (said, tracebacks)
