"""Classifier and parser accuracy on real bounces Relais did not write.

The corpus is flufl.bounce 6.0.0's tests/data (vendored in tests/data/flufl_bounce with its
Apache-2.0 licence): 116 bounces from Postfix, Exim, qmail, sendmail, Exchange, GroupWise,
Yahoo, AOL and many smaller MTAs, with the recipients flufl's own tests expect.

Measured when this test was written: 115 of 116 mapped to exactly the expected recipients
(with the expected permanent/temporary split); of the 144 recipients reported, 116 got a
category other than "uncategorized". The floors below leave a small margin for rule changes.
Since flufl's LLNL detector is left out (services/bounce/parse.py: it took any ", <address>," in an
out-of-office reply for a failure), llnl_01.txt, that laboratory's own format, is read as no bounce.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from services.bounce.classify import BounceCategory, is_hard
from services.bounce.parse import ParsedBounce, parse_bounce, parse_message

CORPUS = Path(__file__).resolve().parents[1] / "data" / "flufl_bounce"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
RECIPIENTS_FLOOR = 112
CATEGORISED_FLOOR = 112


def parsed(name: str) -> ParsedBounce:
    return parse_bounce(parse_message((CORPUS / name).read_bytes()))


def test_corpus_is_complete() -> None:
    assert len(EXPECTED) == 116
    assert (CORPUS / "LICENSE").exists()
    assert all((CORPUS / row["file"]).exists() for row in EXPECTED)


def test_recipients_and_categories_meet_the_measured_floor() -> None:
    right = 0
    categories: collections.Counter[str] = collections.Counter()
    misses = []
    for row in EXPECTED:
        result = parsed(row["file"])
        want = {a.lower() for a in row["addresses"]}
        got = {r.recipient.lower() for r in result.recipients if r.permanent != row["temporary"]}
        everything = {r.recipient.lower() for r in result.recipients}
        if (want and got == want) or (not want and not everything):
            right += 1
        else:
            misses.append((row["file"], sorted(want), sorted(everything)))
        categories.update(str(r.category) for r in result.recipients)
    categorised = sum(n for c, n in categories.items() if c != BounceCategory.UNCATEGORIZED)
    print(
        f"\nrecipients right: {right}/{len(EXPECTED)}; categorised: {categorised}/{sum(categories.values())}"
    )
    print(dict(categories.most_common()))
    assert right >= RECIPIENTS_FLOOR, misses
    assert categorised >= CATEGORISED_FLOOR


@pytest.mark.parametrize(
    ("name", "recipient", "category"),
    [
        ("postfix_01.txt", "xxxxx@local.ie", BounceCategory.INVALID_RECIPIENT),
        ("exim_01.txt", "userx@its.example.nl", BounceCategory.INVALID_RECIPIENT),
        ("yahoo_03.txt", "userx@example.com", BounceCategory.INACTIVE_MAILBOX),
        ("simple_14.txt", "usery@example.com", BounceCategory.QUOTA_ISSUES),
        ("sendmail_01.txt", "zzzzz@nfg.nl", BounceCategory.ROUTING_ERRORS),
    ],
)
def test_known_samples_get_the_category_an_operator_would_give(
    name: str, recipient: str, category: BounceCategory
) -> None:
    by_address = {r.recipient.lower(): r for r in parsed(name).recipients}
    assert by_address[recipient].category is category


def test_temporary_notices_never_count_as_hard() -> None:
    for row in EXPECTED:
        if row["temporary"]:
            for r in parsed(row["file"]).recipients:
                assert not (r.permanent and is_hard(r.category)), row["file"]
