"""How the ingress reads a command line before aiosmtpd acts on it: the longest line each command
may have, `<local@domain>` arguments of MAIL/RCPT without the RFC 5322 parser, AUTH mechanism
names in any case, and lines that are no commands but a message or an HTTP request. Pure
functions: no sockets."""

from __future__ import annotations

import collections
import re

from aiosmtpd.smtp import SMTP

from services.core.addresses import PLAIN_ADDR_SPEC

# RFC 4954 4: an AUTH command with its initial response, or a response line of the exchange, may
# be this long (without its CRLF), as deployed mechanisms need.
AUTH_LINE_LIMIT = 12288
_COMMAND_SIZE_LIMITS = {
    # SIZE (RFC 1870) 26, SMTPUTF8 (RFC 6531) 10, RET and ENVID (RFC 3461) 100, AUTH= (RFC 4954) 500.
    "MAIL": 512 + 26 + 10 + 100 + 500,
    "RCPT": 512 + 500,  # NOTIFY and ORCPT (RFC 3461)
    "AUTH": AUTH_LINE_LIMIT,
}


def command_size_limits() -> collections.defaultdict[str, int]:
    """Longest command line, per command, for one session: RFC 5321 4.5.3.1.4's 512 plus what
    each advertised extension adds (the reader's limit, AUTH's, caps them all)."""
    return collections.defaultdict(lambda: SMTP.command_size_limit, _COMMAND_SIZE_LIMITS)


# `<dot-atom@host.name>` and what follows it. Anything else (quoted local parts, routes, address
# literals, comments, RFC 2047 lookalikes, non-ASCII) goes through aiosmtpd's RFC 5322 parser.
_PLAIN_ANGLE_ADDR = re.compile(rf"<({PLAIN_ADDR_SPEC})>[ \t]*")


# `<...@domain.>` at the start of an argument: a domain written with the root's empty label after
# its last one. The dot must follow a label character: "domain..", "@." and "[literal]." are not
# this form and stay malformed.
_ROOT_DOT = re.compile(r"<[^<>]*@[^<>@\s]*[^<>@\s.\[\]](?=\.>)")
# The same without angle brackets, which aiosmtpd (like Postfix) takes from lenient clients.
_BARE_ROOT_DOT = re.compile(r"[^<>@\s]+@[^<>@\s]*[^<>@\s.\[\]](?=\.(?:\s|$))")


def without_root_dot(arg: str) -> str:
    """A MAIL/RCPT argument whose address's domain ends with one trailing dot, without the dot:
    `<a@example.com.>` is `<a@example.com>` (and `a@example.com.` is `a@example.com`), as
    Postfix's trivial-rewrite takes it. Dropped before parsing, so every check after sees only
    the domain as it is configured and compared; the result is an argument the client could have
    sent itself, so no check can be skipped."""
    if arg.startswith("<"):
        match = _ROOT_DOT.match(arg) if ".>" in arg else None
    else:
        match = _BARE_ROOT_DOT.match(arg) if arg.partition(" ")[0].endswith(".") else None
    if match is None:
        return arg
    return arg[: match.end()] + arg[match.end() + 1 :]


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of `<local@domain> params` when it is a plain dot-atom address,
    exactly as `email._header_value_parser.get_angle_addr` would return them; else None.

    aiosmtpd parses every MAIL/RCPT argument with the RFC 5322 header parser and also defines a
    typing.Protocol class on each call: about 10% of the ingress' CPU at 10 recipients a message.
    """
    match = _PLAIN_ANGLE_ADDR.match(arg)
    if match is None or "=?" in arg:
        return None
    rest = arg[match.end() :]
    if rest.startswith("("):  # a comment, which the parser would swallow
        return None
    return match.group(1), rest


# A message header field's name and its colon (RFC 5322 3.6.8: printable ASCII but ":"), at the
# start of a line: Postfix's is_header().
_HEADER_FIELD = re.compile(r"[!-9;-~]+:")
# HTTP methods that begin a request sent to the SMTP port: Postfix's smtpd_forbidden_commands.
_HTTP_METHODS = frozenset({"CONNECT", "GET", "POST"})


def non_smtp_command(word: str) -> bool:
    """Whether a line's first word, which names no command, shows that the client is sending
    text of another kind: a message header field (`SUBJECT:`, `X-MAILER:RELAIS`), i.e. a message
    sent without waiting for 354 whose DATA was refused, or an HTTP request (a web server's
    SSRF). Lines further down such text may look like SMTP commands; none may be obeyed."""
    return word.upper() in _HTTP_METHODS or _HEADER_FIELD.match(word) is not None


def auth_mechanism_upper(arg: str | None) -> str | None:
    """AUTH's argument with the mechanism name in upper case: aiosmtpd looks it up as written,
    but SMTP keywords are case-insensitive (RFC 5321 2.4) and Postfix's SASL back-ends take
    `auth login` too. The initial response, base64, keeps its case."""
    if not arg:
        return arg
    mechanism, *response = arg.split(maxsplit=1)
    return " ".join([mechanism.upper(), *response])
