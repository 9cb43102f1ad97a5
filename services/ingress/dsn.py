"""RFC 3461 DSN parameters: RET and ENVID at MAIL FROM, NOTIFY and ORCPT at RCPT TO; and RFC
4954's AUTH parameter of MAIL FROM, taken where AUTH is offered and discarded.

aiosmtpd refuses parameters it does not know (555), so `RelaisSMTP` takes these out of the
command first, checks them here, and the handler records them in the envelope for the bounce
service. Pure functions: no sockets.
"""

from __future__ import annotations

import re

from services.core.addresses import printable_ascii
from services.ingress.replies import BAD_AUTH_PARAMETER, Verdict

BAD_DSN_PARAMETER = Verdict(501, "5.5.4", "Invalid DSN parameter")
MAIL_PARAMS = ("RET", "ENVID")
# RFC 4954 5: where AUTH is offered, MAIL may carry AUTH=<> or AUTH=<xtext of the submitter>.
MAIL_AUTH_PARAM = "AUTH"
RCPT_PARAMS = ("NOTIFY", "ORCPT")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


def xtext_decode(value: str) -> str | None:
    """RFC 3461 4: '+' and two upper-case hex digits stand for one octet; None if malformed.

    Also None unless the decoded value is printable US-ASCII, which RFC 3461 4.2 and 4.4 require
    of ORCPT and ENVID: both end up in the DSN's header fields, where a "+0D+0A" would be a
    line break."""
    if not _XTEXT.match(value):
        return None
    decoded = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    return decoded if printable_ascii(decoded) else None


def split_params(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The command argument without the named parameters, and those parameters (names upper-cased;
    the value "" for one given more than once).

    Parameters follow the path (RFC 5321 4.1.2), which ends at the first '>' outside a quoted
    local part: a parameter value may hold '>' too (an ENVID of "<id@host>"). Without angle
    brackets the path ends at the first blank after "FROM:" / "TO:".
    """
    end = _path_end(arg)
    if end < 0:
        return arg, {}
    path, rest = arg[:end], arg[end:]
    kept: list[str] = []
    found: dict[str, str] = {}
    for token in rest.split():
        key, eq, value = token.partition("=")
        if key.upper() in names and eq:
            # Given twice: no value is taken (as Postfix, which refuses a repeated RET, ENVID,
            # NOTIFY or ORCPT); an empty one is invalid for every parameter named here.
            found[key.upper()] = "" if key.upper() in found else value
        else:
            kept.append(token)
    return " ".join([path, *kept]), found


def _path_end(arg: str) -> int:
    """Where the path of `FROM:<path> params` (or `TO:`) ends, or -1 when it does not end."""
    _, colon, after = arg.partition(":")
    if not colon:
        return -1
    start = len(arg) - len(after.lstrip())
    if not arg.startswith("<", start):
        blank = re.compile(r"\s").search(arg, start)
        return blank.start() if blank else len(arg)
    quoted = escaped = False
    for index in range(start + 1, len(arg)):
        char = arg[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index + 1
    return -1


def mail_verdict(params: dict[str, str]) -> tuple[Verdict | None, str, str]:
    """(verdict, RET, decoded ENVID)."""
    ret = params.get("RET", "").upper()
    if "RET" in params and ret not in ("FULL", "HDRS"):
        return BAD_DSN_PARAMETER, "", ""
    envid = ""
    if "ENVID" in params:
        decoded = xtext_decode(params["ENVID"])
        if decoded is None or not decoded or len(params["ENVID"]) > 100:
            return BAD_DSN_PARAMETER, "", ""
        envid = decoded
    return None, ret, envid


def mail_auth_verdict(value: str) -> Verdict | None:
    """MAIL's AUTH parameter: checked, then discarded. RFC 4954 5 lets a server trust no
    client's claim about who submitted a message, provided it still takes valid ones; the
    message is the authenticated account's whatever the parameter says."""
    return None if value == "<>" or xtext_decode(value) else BAD_AUTH_PARAMETER


def rcpt_verdict(params: dict[str, str]) -> tuple[Verdict | None, str, str]:
    """(verdict, NOTIFY as given upper-cased, decoded ORCPT 'addr-type;address')."""
    notify = params.get("NOTIFY", "").upper()
    if "NOTIFY" in params:
        values = notify.split(",")
        if values != ["NEVER"] and (
            not values or not set(values) <= _NOTIFY or len(set(values)) != len(values)
        ):
            return BAD_DSN_PARAMETER, "", ""
    orcpt = ""
    if "ORCPT" in params:
        addr_type, semi, address = params["ORCPT"].partition(";")
        decoded = xtext_decode(address) if semi else None
        if not _ADDR_TYPE.match(addr_type) or not decoded or len(params["ORCPT"]) > 500:
            return BAD_DSN_PARAMETER, "", ""
        orcpt = f"{addr_type};{decoded}"
    return None, notify, orcpt
