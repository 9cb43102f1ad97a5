"""Suppression records as the router reads them: a newer release's fields are ignored, and an
unreadable record suppresses nothing instead of failing the message on every redelivery."""

from __future__ import annotations

import json

import pytest

from services.core import suppression
from services.core.suppression import Suppression

RECORD = {"account": "acme", "address": "gone@x.test", "reason": "hard_bounce", "at": 1.0}


def test_a_record_with_fields_from_a_newer_release_still_suppresses() -> None:
    entry = suppression._active(json.dumps({**RECORD, "added_in_a_later_release": "x"}).encode())
    assert entry == Suppression(account="acme", address="gone@x.test", reason="hard_bounce", at=1.0)


@pytest.mark.parametrize("value", [b"not json", b"[1, 2]", json.dumps({"account": "acme"}).encode()])
def test_an_unreadable_record_suppresses_nothing(value: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert suppression._active(value) is None
    assert "unreadable suppression record" in caplog.text
