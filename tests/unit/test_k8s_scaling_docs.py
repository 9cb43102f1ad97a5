"""docs/operations.md names every consumer KEDA scales a service on, with its threshold.

The guide said bounce scaled on "either of its two consumers" at 1,000 after bounce-flush (200)
was added, and left the router's router-verdicts out: an operator tuning lag thresholds from
the guide would miss the consumer that actually drives the scaling.
"""

from __future__ import annotations

from tests.unit.k8s_manifests import BASE, by_kind, render
from tests.unit.test_k8s_docs import _section


def test_scale_section_names_each_lag_trigger_with_its_threshold() -> None:
    section = _section("## Scale each service")
    checked = 0
    for scaled in by_kind(render(BASE), "ScaledObject"):
        if scaled["spec"]["scaleTargetRef"]["name"] not in ("relais-router", "relais-bounce"):
            continue
        for trigger in scaled["spec"]["triggers"]:
            consumer = trigger["metadata"]["consumer"]
            threshold = f"{int(trigger['metadata']['lagThreshold']):,}"
            assert f"`{consumer}` {threshold}" in section, f"{consumer} at {threshold} is not in the guide"
            checked += 1
    assert checked >= 5
