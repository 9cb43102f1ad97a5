"""Which JetStream refusals mean "no room" (`is_store_full`): the ingress answers them 452 4.3.1
at once, and delivery keeps a sent job until its outcome can be stored. Each is nats-server's
answer to a write that found its store, its account's or its stream's limits full."""

from __future__ import annotations

import nats.errors
import pytest
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError

from services.core.bus import is_store_full


@pytest.mark.parametrize(
    "refusal",
    [
        ServiceUnavailableError(code=503, err_code=10023, description="insufficient resources"),
        APIError(code=400, err_code=10002, description="resource limits exceeded for account"),
        ServiceUnavailableError(code=503, err_code=10077, description="maximum bytes exceeded"),
        ServiceUnavailableError(code=503, err_code=10077, description="maximum messages exceeded"),
    ],
)
def test_no_room(refusal: Exception) -> None:
    assert is_store_full(refusal)


@pytest.mark.parametrize(
    "failure",
    [
        # Too large is the message's own fault, the same however much room is made.
        BadRequestError(code=400, err_code=10054, description="message size exceeds maximum allowed"),
        ServiceUnavailableError(code=503, err_code=10077, description="message too large"),
        ServiceUnavailableError(code=503, err_code=10077, description="store closed"),
        ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable"),
        APIError(code=400, err_code=10071, description="wrong last sequence: 7"),
        nats.errors.NoRespondersError(),
        TimeoutError(),
    ],
)
def test_other_failures(failure: Exception) -> None:
    assert not is_store_full(failure)
