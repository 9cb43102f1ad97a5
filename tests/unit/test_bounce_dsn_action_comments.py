"""A DSN field may carry a comment after its value (RFC 3464 fields are structured header
fields), and some MTAs write one after the Action: the DSN is still read field by field."""

from __future__ import annotations

import pytest

from services.bounce.classify import DEFAULT_RULES, BounceCategory
from services.bounce.inbound import findings
from services.bounce.parse import parse_bounce, parse_message
from tests.support.bounce_samples import postfix_dsn
from tests.unit.test_bounce_inbound import CONFIG, rp


def _dsn(to: str, action: str) -> bytes:
    raw = postfix_dsn(to=to, recipient="gone@alpha.test").replace(
        b"Action: failed\r\n", f"Action: {action}\r\n".encode()
    )
    # Prose that gives no reason: only the DSN's Status and Diagnostic-Code say 5.1.1.
    return raw.replace(
        b"host mx2.alpha.test said: 550 5.1.1 <gone@alpha.test>: Recipient address rejected: User unknown",
        b"delivery failed",
    )


@pytest.mark.parametrize(
    ("action", "permanent"),
    [
        ("failed (Bad destination mailbox address)", True),
        ("FAILED(permanent)", True),
        ("delayed (will retry)", False),
    ],
)
def test_a_comment_after_the_action_keeps_the_dsn_fields(action: str, permanent: bool) -> None:
    to = rp(["gone@alpha.test"])
    parsed = parse_bounce(parse_message(_dsn(to, action)))
    assert parsed.kind == "dsn"
    (recipient,) = parsed.recipients
    assert (recipient.permanent, recipient.status) == (permanent, "5.1.1")
    assert recipient.category is BounceCategory.INVALID_RECIPIENT
    (finding,) = findings(_dsn(to, action), [to], CONFIG, DEFAULT_RULES).findings
    assert finding.suppresses is permanent


def test_a_success_action_with_a_comment_is_still_no_failure() -> None:
    to = rp(["gone@alpha.test"])
    raw = _dsn(to, "delivered (to mailbox)").replace(b"Status: 5.1.1", b"Status: 2.0.0")
    assert findings(raw, [to], CONFIG, DEFAULT_RULES).findings == []
