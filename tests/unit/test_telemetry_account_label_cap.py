"""Label values stay bounded when what they name is not: accounts are added at run time."""

from __future__ import annotations

import pytest

from services.core import metrics
from services.core.events import event_for
from tests.support.relais import an_envelope

pytestmark = pytest.mark.unit


def _accepted(account: str) -> None:
    env = an_envelope("a@alpha.test", account=account, pool="labelpool")
    metrics.observe_event(event_for("accepted", env, env.recipients))


def _accepted_accounts() -> set[str]:
    found = set()
    for family in metrics.REGISTRY.collect():
        for s in family.samples:
            if s.name == "relais_accepted_messages_total" and s.labels["account"].startswith("capped-"):
                found.add(s.labels["account"])
            if s.name == "relais_accepted_messages_total" and s.labels["account"] == "other":
                found.add("other")
    return found


def test_accounts_beyond_the_cap_count_as_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "ACCOUNTS", metrics.BoundedLabel(cap=2), raising=False)
    for i in range(5):
        _accepted(f"capped-{i}")
    assert _accepted_accounts() == {"capped-0", "capped-1", "other"}
