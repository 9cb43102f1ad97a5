"""How long JetStream keeps a push-back back-off: never less than the back-off lasts, and pauses,
in the same bucket, for good."""

from __future__ import annotations

import pytest

from services.core.config import Config
from services.core.pause import ttl_header
from services.core.topology import DELIVERY_CONTROL_BUCKET, kv_configs


@pytest.mark.parametrize("seconds", [0.001, 0.5, 1.0, 1.2, 59.999, 300.0, 3600.25])
def test_the_record_s_ttl_is_never_shorter_than_the_back_off(seconds: float) -> None:
    # The header counts whole seconds; rounded down, the record would go (and the throttle
    # lift) up to a second early.
    ttl = int(ttl_header(seconds))
    assert seconds <= ttl < seconds + 1


@pytest.mark.parametrize("seconds", [0.0, -3.0])
def test_a_back_off_already_over_still_gets_a_valid_ttl(seconds: float) -> None:
    assert ttl_header(seconds) == "1"  # JetStream's smallest TTL; 0 would be refused


def test_the_control_bucket_expires_records_one_by_one_and_never_as_a_whole() -> None:
    (bucket,) = [b for b in kv_configs(Config()) if b.bucket == DELIVERY_CONTROL_BUCKET]
    assert not bucket.ttl, "a bucket TTL would end pauses, and back-offs longer than it"
    assert bucket.limit_marker_ttl, "workers hear of an expired back-off through its marker"
