"""RFC 3461 parameters at the ingress: split off the command, validated, xtext-decoded."""

from __future__ import annotations

import pytest

from services.ingress import dsn


def test_split_params_keeps_the_rest() -> None:
    arg, found = dsn.split_params("FROM:<a@acme.test> SIZE=100 ret=hdrs ENVID=x+2By", dsn.MAIL_PARAMS)
    assert arg == "FROM:<a@acme.test> SIZE=100"
    assert found == {"RET": "hdrs", "ENVID": "x+2By"}
    assert dsn.split_params("TO:<b@alpha.test>", dsn.RCPT_PARAMS) == ("TO:<b@alpha.test>", {})
    # A parameter given twice keeps no value: "" is refused for each of them.
    arg, found = dsn.split_params("TO:<b@alpha.test> NOTIFY=NEVER notify=SUCCESS", dsn.RCPT_PARAMS)
    assert (arg, found) == ("TO:<b@alpha.test>", {"NOTIFY": ""})
    assert dsn.rcpt_verdict(found)[0] == dsn.BAD_DSN_PARAMETER


def test_mail_parameters() -> None:
    assert dsn.mail_verdict({"RET": "hdrs", "ENVID": "QQ+2B1"}) == (None, "HDRS", "QQ+1")
    assert dsn.mail_verdict({})[0] is None
    bad_envids = ("a+zz", "", "x" * 101, "a+0D+0Ab")  # the last decodes to a line break
    for bad in ({"RET": "ALL"}, {"RET": ""}, *({"ENVID": value} for value in bad_envids)):
        assert dsn.mail_verdict(bad)[0] == dsn.BAD_DSN_PARAMETER


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"NOTIFY": "success,failure"}, (None, "SUCCESS,FAILURE", "")),
        ({"NOTIFY": "NEVER"}, (None, "NEVER", "")),
        ({"ORCPT": "rfc822;Bob+40example.com"}, (None, "", "rfc822;Bob@example.com")),
        ({"NOTIFY": "NEVER,SUCCESS"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        ({"NOTIFY": "SUCCESS,SUCCESS"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        ({"NOTIFY": "SOMETIMES"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        ({"ORCPT": "bob@example.com"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        ({"ORCPT": "rfc822;"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        # Decoded, ORCPT lands in the DSN's header: no line breaks, no other control characters.
        ({"ORCPT": "rfc822;a+0D+0AX-Injected:+20yes@x.test"}, (dsn.BAD_DSN_PARAMETER, "", "")),
        ({"ORCPT": "rfc822;a+00@x.test"}, (dsn.BAD_DSN_PARAMETER, "", "")),
    ],
)
def test_rcpt_parameters(params: dict[str, str], expected: tuple[object, str, str]) -> None:
    assert dsn.rcpt_verdict(params) == expected


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@acme.test> ENVID=<1@c.test>", ("FROM:<a@acme.test>", {"ENVID": "<1@c.test>"})),
        ("FROM:a@acme.test RET=HDRS", ("FROM:a@acme.test", {"RET": "HDRS"})),
        ("FROM: <> RET=FULL", ("FROM: <>", {"RET": "FULL"})),
        (
            "TO:<b@alpha.test> ORCPT=rfc822;<b@alpha.test>",
            ("TO:<b@alpha.test>", {"ORCPT": "rfc822;<b@alpha.test>"}),
        ),
        # A quoted local part may hold '>' and blanks, even what looks like a parameter.
        ('FROM:<"a>b"@acme.test> RET=FULL', ('FROM:<"a>b"@acme.test>', {"RET": "FULL"})),
        ('FROM:<"x RET=FULL"@acme.test>', ('FROM:<"x RET=FULL"@acme.test>', {})),
        (
            'FROM:<"x\\" RET=FULL>"@acme.test> RET=HDRS',
            ('FROM:<"x\\" RET=FULL>"@acme.test>', {"RET": "HDRS"}),
        ),
        # No end: left whole, for aiosmtpd to refuse.
        ("FROM:<a@acme.test RET=FULL", ("FROM:<a@acme.test RET=FULL", {})),
    ],
)
def test_parameters_are_split_off_where_the_path_ends(arg: str, expected: tuple[str, dict[str, str]]) -> None:
    assert dsn.split_params(arg, (*dsn.MAIL_PARAMS, *dsn.RCPT_PARAMS)) == expected
