"""Reply shaping at the protocol edge: aiosmtpd's built-in replies get enhanced status codes."""

from __future__ import annotations

from services.core.config import IngressConfig
from services.ingress.limits import ConnectionGate
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
