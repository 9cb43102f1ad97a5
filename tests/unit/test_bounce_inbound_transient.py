"""Which failures of an inbound report are NATS not answering, waited out without using up one of
the report's deliveries, and which are the report's own, counted towards `MAX_DELIVERIES`."""

from __future__ import annotations

import nats.errors
import pytest
from nats.js.errors import APIError, ServiceUnavailableError

from services.bounce.inbound import is_transient
from services.core.bus import BrokerUnavailable, Retry


def _broker(cause: Exception) -> BrokerUnavailable:
    """What `Bus.publish` raises when JetStream fails it with `cause`."""
    try:
        raise BrokerUnavailable(f"publish failed: {cause!r}") from cause
    except BrokerUnavailable as exc:
        return exc


@pytest.mark.parametrize(
    "failure",
    [
        Retry("account records in KV not read yet"),
        _broker(nats.errors.NoRespondersError()),
        _broker(TimeoutError()),
        _broker(ServiceUnavailableError(code=503, description="JetStream system temporarily unavailable")),
        BrokerUnavailable("suppression entry acme.x: too much contention"),
        nats.errors.TimeoutError(),
        TimeoutError(),
    ],
)
def test_nats_not_answering_is_waited_out(failure: Exception) -> None:
    assert is_transient(failure)


@pytest.mark.parametrize(
    "failure",
    [
        # JetStream's answer to an event too large for it comes back every time.
        _broker(nats.errors.MaxPayloadError()),
        _broker(APIError(code=400, err_code=10054, description="message size exceeds maximum allowed")),
        MemoryError(),
        ValueError("a bug in applying the report"),
        UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
    ],
)
def test_the_reports_own_failures_count(failure: Exception) -> None:
    assert not is_transient(failure)
