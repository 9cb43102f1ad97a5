"""Reply shaping at the protocol edge: aiosmtpd's built-in replies get enhanced status codes."""

from __future__ import annotations

from services.core.config import IngressConfig
from services.ingress.commands import non_smtp_command, plain_angle_addr
from services.ingress.door import Door
from services.ingress.limits import ConnectionGate, GatePass
from services.ingress.protocol import enhance, is_error
from services.ingress.replies import LINE_TOO_LONG, MESSAGE_TOO_BIG, RELAY_DENIED


def test_builtin_size_and_line_replies_are_rewritten() -> None:
    assert enhance("552 Error: Too much mail data") == str(MESSAGE_TOO_BIG)
    assert enhance("552 Error: message size exceeds fixed maximum message size") == str(MESSAGE_TOO_BIG)
    assert enhance("500 Line too long (see RFC5321 4.5.3.1.6)") == str(LINE_TOO_LONG)


def test_missing_enhanced_codes_are_added() -> None:
    assert enhance("503 Error: need MAIL command") == "503 5.5.1 need MAIL command"
    assert enhance('500 Error: command "BDAT" not recognized') == '500 5.5.2 command "BDAT" not recognized'
    assert enhance("501 Syntax: MAIL FROM: <address>") == "501 5.5.4 Syntax: MAIL FROM: <address>"


def test_replies_with_codes_or_multiline_untouched() -> None:
    assert enhance(str(RELAY_DENIED)) == str(RELAY_DENIED)
    assert enhance("250-SIZE 1000") == "250-SIZE 1000"
    assert enhance("250 HELP") == "250 HELP"
    assert enhance("354 End data with <CR><LF>.<CR><LF>") == "354 End data with <CR><LF>.<CR><LF>"


def test_error_counting() -> None:
    assert is_error("554 5.7.1 Relay access denied")
    assert is_error("452 4.5.3 Too many recipients")
    assert not is_error("421 4.7.0 bye")
    assert not is_error("250 2.0.0 OK")


def test_connection_gate_per_ip() -> None:
    gate = ConnectionGate(IngressConfig(max_connections_per_ip=2))
    assert gate.admit("192.0.2.1") and gate.admit("192.0.2.1")
    assert not gate.admit("192.0.2.1")
    assert gate.admit("192.0.2.2")
    gate.release("192.0.2.1")
    assert gate.admit("192.0.2.1")


def test_plain_addresses_parse_exactly_as_aiosmtpd_would() -> None:
    """The fast path of MAIL/RCPT arguments returns what the RFC 5322 parser returns, and leaves
    everything it is not sure about to that parser."""
    import random
    from email._header_value_parser import get_angle_addr

    fixed = [
        "<a@b.c>",
        "<a@b.c> SIZE=1",
        "<a@b.c>  SIZE=1 BODY=8BITMIME",
        "<a@b.c>\tX",
        "<a@b.c>X",
        "<a.b+c=d@e-f.g> NOTIFY=NEVER",
        "<a@b.c> (comment) SIZE=1",
        '<"q"@b.c>',
        "<a@[1.2.3.4]>",
        "<@r:a@b.c>",
        "<=?utf-8?q?x?=@b.c>",
        "<ü@b.c>",
        "<a..b@c>",
        "<a@b..c>",
        "<>",
        "<> SIZE=1",
    ]
    rng = random.Random(5321)
    locals_ = [
        "a",
        "b.c",
        "x+y",
        "a=b",
        "=?",
        "?",
        "..",
        ".a",
        "a.",
        "ü",
        '"q"',
        "a b",
        "(c)",
        "~!#$%&'*/^_`{|}",
    ]
    domains = ["b.c", "b..c", "[1.2.3.4]", "b-", "-b", "b", "ü.de", "b.c.", "B.C", "b_c", "b c"]
    tails = ["", " ", " SIZE=1", "\tX", "X", " (c) X", "(c)", ">", "  ", " \t(c)", " =?x?="]
    fuzzed = [
        f"<{''.join(rng.choices(locals_, k=rng.randint(1, 3)))}@{rng.choice(domains)}>{rng.choice(tails)}"
        for _ in range(3000)
    ]
    taken = 0
    for arg in fixed + fuzzed:
        plain = plain_angle_addr(arg)
        if plain is None:
            continue
        taken += 1
        address, rest = get_angle_addr(arg)
        assert plain == (address.addr_spec, rest), arg
    assert plain_angle_addr("<a@b.c> SIZE=1") == ("a@b.c", "SIZE=1")
    for tricky in (
        "<a@b.c> (comment) SIZE=1",
        '<"q"@b.c>',
        "<a@[1.2.3.4]>",
        "<@r:a@b.c>",
        "<=?utf-8?q?x?=@b.c>",
    ):
        assert plain_angle_addr(tricky) is None, tricky
    assert taken > 100  # the fast path is exercised, not only skipped


async def test_connections_built_from_the_prototype_match_aiosmtpd_own_setup() -> None:
    import types

    from services.ingress.protocol import RelaisSMTP
    from services.ingress.prototype import Prototype

    class Handler:
        async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
            return responses

        async def auth_PLAIN(self, server, args):  # type: ignore[no-untyped-def]
            return None

    handler = Handler()
    door = Door(ConnectionGate(IngressConfig()), "127.0.0.1:2525")
    prototype = Prototype()
    options = {
        "hostname": "relais.test",
        "decode_data": False,
        "enable_SMTPUTF8": True,
        "auth_require_tls": False,
    }

    def make(p: Prototype | None) -> RelaisSMTP:
        return RelaisSMTP(handler, door=door, max_errors=5, prototype=p, **options)

    make(prototype)
    copied, real = make(prototype), make(None)
    assert prototype._state is not None, "the first connection was captured"
    assert set(vars(copied)) == set(vars(real))
    for name, want in vars(real).items():
        got = vars(copied)[name]
        if isinstance(want, types.MethodType):
            assert got.__func__ is want.__func__, name
            assert (got.__self__ is copied) == (want.__self__ is real), name
        elif isinstance(want, dict):
            assert got is not want and set(got) == set(want), name
        elif isinstance(want, str | int | float | bool | type(None)):
            assert got == want, name
        else:
            assert type(got) is type(want), name
    # Bound to the connection that uses them, not to the one they were copied from.
    assert copied._smtp_methods["MAIL"].__self__ is copied
    assert copied._auth_methods["PLAIN"].method.__self__ is handler
    # Different constructor arguments: aiosmtpd's own set-up again.
    other = RelaisSMTP(handler, door=door, max_errors=5, prototype=prototype, **{**options, "hostname": "x"})
    assert other.hostname == "x"


async def test_a_multiline_reply_is_one_write() -> None:
    from aiosmtpd.smtp import Session

    from services.ingress.protocol import RelaisSMTP

    class Writer:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        async def drain(self) -> None:
            return None

    door = Door(ConnectionGate(IngressConfig()), "127.0.0.1:2525")
    conn = RelaisSMTP(object(), door=door, max_errors=5, hostname="relais.test")
    conn._writer = writer = Writer()  # type: ignore[assignment]
    conn.session = Session(conn.loop)
    for line in ("250-relais.test", "250-PIPELINING", "250 HELP"):
        await conn.push(line)
    await conn.push("250 2.1.0 Ok")
    assert writer.writes == [b"250-relais.test\r\n250-PIPELINING\r\n250 HELP\r\n", b"250 2.1.0 Ok\r\n"]


def test_a_gate_pass_counts_once_and_moves_from_its_load_balancer_to_its_client() -> None:
    gate = ConnectionGate(IngressConfig(max_connections_per_ip=1, max_proxy_pending_per_peer=2))
    waiting = [GatePass(gate) for _ in range(3)]
    assert [p.wait("10.0.0.1") for p in waiting] == [True, True, False]
    assert gate.waiting_connections("10.0.0.1") == 2
    # The PROXY header names the client: the load balancer's count goes, the client's comes.
    assert waiting[0].admit("192.0.2.1") and not waiting[1].admit("192.0.2.1")
    assert gate.waiting_connections("10.0.0.1") == 0 and gate.open_connections("192.0.2.1") == 1
    for p in waiting:
        p.release()
        p.release()  # a handshake that failed and a session that ended: still given back once
    assert gate.open_connections("192.0.2.1") == 0 and gate.waiting_connections("10.0.0.1") == 0


def test_header_lines_and_http_requests_are_no_commands() -> None:
    # The first word of a line, as aiosmtpd passes it on (upper case, up to the first space).
    for word in ("SUBJECT:", "FROM:", "X-MAILER:RELAIS", "CONTENT-TYPE:\tTEXT/PLAIN", 'X"Q:', "GET", "POST"):
        assert non_smtp_command(word), word
    for word in ("MAIL", "RCPT", "DATA", "BDAT", "HELLO", "GETS", "", ":", " SUBJECT:", "\tFROM:", "A\x7fB:"):
        assert not non_smtp_command(word), word
