"""A message whose handler keeps failing is retried ever more slowly, up to 5 minutes apart."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from services.core.bus import _error_delay


def _delivered(times: int) -> Msg:
    # The reply subject JetStream gives a pulled message: its metadata, delivery count included.
    reply = f"$JS.ACK.RELAIS_ROUTE.router.{times}.10.10.1700000000000000000.0"
    return Msg(_client=None, subject="relais.route", reply=reply, data=b"")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("times", "delay"), [(1, 5.0), (2, 10.0), (3, 20.0), (6, 160.0), (7, 300.0), (1000, 300.0)]
)
def test_the_delay_doubles_with_each_delivery_up_to_five_minutes(times: int, delay: float) -> None:
    assert _error_delay(_delivered(times)) == delay


def test_a_message_without_metadata_waits_the_first_delay() -> None:
    assert _error_delay(Msg(_client=None, subject="x", reply="", data=b"")) == 5.0  # type: ignore[arg-type]
