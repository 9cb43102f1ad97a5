"""The built-in push-back rules tell greylisting (a 4.7.1 "try again later" per new recipient)
from throttling: the first must slow nothing, the second still must."""

from __future__ import annotations

import pytest

from services.core.outcome import Reply
from services.delivery.shaping import default_shaping


@pytest.mark.parametrize(
    "reply",
    [
        Reply(451, "4.7.1", "Try again later", "RCPT"),
        Reply(451, "4.7.1", "Greylisting in action, please come back later", "RCPT"),
    ],
)
def test_greylisting_texts_match_no_built_in_rule(reply: Reply) -> None:
    assert default_shaping().pushback_for(reply, "alpha.test") is None


@pytest.mark.parametrize(
    "reply",
    [
        Reply(421, "4.7.0", "Too many connections from your IP", "CONNECT"),
        Reply(451, "4.7.10", "Try again later", "DATA"),
        Reply(451, "4.7.1", "Sending rate limit exceeded", "RCPT"),
        Reply(450, "4.7.1", "Throttled, slow down", "RCPT"),
    ],
)
def test_throttles_still_push_back(reply: Reply) -> None:
    assert default_shaping().pushback_for(reply, "alpha.test") is not None
