"""`relais trace <id> --file <path>` given a path it cannot read as a trace file: a directory, a
file of something else (not UTF-8), a file it may not read. Each used to end in a traceback
(IsADirectoryError, UnicodeDecodeError); the command says what is wrong with the file and exits
1, and a readable trace file with one foreign line still shows its spans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.cli import main

MESSAGE_ID = "0190f3a1b2c-abcdef"


def a_span(message_id: str) -> dict[str, object]:
    """A record as `telemetry.span_record` writes it."""
    return {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "parent_id": "",
        "name": "relais.deliver",
        "kind": "CONSUMER",
        "service": "relais-delivery",
        "start": 1_000_000_000,
        "end": 2_000_000_000,
        "attributes": {"relais.message_id": message_id},
        "events": [],
        "links": [],
        "status": "UNSET",
    }


def test_a_directory_is_no_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", MESSAGE_ID, "--file", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relais: ") and str(tmp_path) in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_it_may_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(a_span(MESSAGE_ID)) + "\n")
    path.chmod(0)
    assert main(["trace", MESSAGE_ID, "--file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relais: ") and str(path) in err, err


def test_bytes_that_are_no_text_are_skipped_like_a_cut_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n[1, 2]\n" + json.dumps(a_span(MESSAGE_ID)).encode() + b"\n")
    assert main(["trace", MESSAGE_ID, "--file", str(path)]) == 0
    assert "relais.deliver" in capsys.readouterr().out


def test_a_file_of_nothing_but_other_bytes_has_no_spans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "traces.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x80\x81")
    assert main(["trace", MESSAGE_ID, "--file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relais: no spans for") and str(path) in err, err
