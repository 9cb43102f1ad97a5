"""The DSN window record of one message: who joins which window, and when a new one opens."""

from __future__ import annotations

import pytest

from services.bounce.hold import DELAYED, FAILED, FlushRequest, Windows, notice_id


def test_the_first_notice_opens_a_window_and_the_next_ones_join_it() -> None:
    ws, first = Windows().join("m-0-1-f", FAILED, new_id="w1", flush_at=100.0)
    assert (first.window_id, first.flush_at, first.schedule) == ("w1", 100.0, True)
    ws, second = ws.join("m-1-1-f", FAILED, new_id="w2", flush_at=103.0)
    assert (second.window_id, second.flush_at, second.schedule) == ("w1", 100.0, False)
    assert ws.by_id["w1"].members == ("m-0-1-f", "m-1-1-f")
    assert list(ws.by_id) == ["w1"]


def test_a_redelivered_member_finds_its_window_and_reschedules_it_while_open() -> None:
    ws, _ = Windows().join("a", FAILED, new_id="w1", flush_at=100.0)
    ws, _ = ws.join("b", FAILED, new_id="w2", flush_at=101.0)
    again, joined = ws.join("b", FAILED, new_id="w3", flush_at=200.0)
    assert again == ws, "nothing changes"
    assert (joined.window_id, joined.flush_at, joined.schedule) == ("w1", 100.0, True)
    closed, _ = ws.close("w1")
    _, late = closed.join("b", FAILED, new_id="w3", flush_at=200.0)
    assert (late.window_id, late.schedule) == ("w1", False), "a closed window's flush is running"


def test_after_the_close_a_new_notice_opens_the_next_window() -> None:
    ws, _ = Windows().join("a", FAILED, new_id="w1", flush_at=100.0)
    ws, window = ws.close("w1")
    assert window is not None and window.closed and window.members == ("a",)
    ws, joined = ws.join("b", FAILED, new_id="w2", flush_at=110.0)
    assert (joined.window_id, joined.schedule) == ("w2", True)
    assert ws.by_id["w2"].members == ("b",)
    assert ws.by_id["w1"].members == ("a",), "the closed window keeps its members until it finishes"


def test_delay_warnings_and_failures_never_share_a_window() -> None:
    ws, failed = Windows().join("a-1-f", FAILED, new_id="w1", flush_at=100.0)
    ws, delayed = ws.join("b-1-d", DELAYED, new_id="w2", flush_at=100.5)
    assert failed.window_id != delayed.window_id and delayed.schedule
    assert ws.by_id["w2"].kind == DELAYED and ws.by_id["w1"].kind == FAILED


def test_close_sent_and_finish_are_idempotent() -> None:
    ws, _ = Windows().join("a", FAILED, new_id="w1", flush_at=100.0)
    ws, first = ws.close("w1")
    again, second = ws.close("w1")
    assert again == ws and first == second
    ws, _ = ws.mark_sent("w1")
    assert ws.by_id["w1"].sent
    assert ws.mark_sent("w1")[0] == ws
    done, _ = ws.finish("w1")
    assert done == Windows() and not done.by_id
    assert done.close("w1") == (done, None), "a finished window is gone: its flush has nothing to do"
    assert done.finish("w1")[0] == done


def test_the_record_round_trips_through_json() -> None:
    ws, _ = Windows().join("a", FAILED, new_id="w1", flush_at=100.25)
    ws, _ = ws.join("b", DELAYED, new_id="w2", flush_at=101.0)
    ws, _ = ws.close("w1")
    ws, _ = ws.mark_sent("w1")
    assert Windows.from_json(ws.to_json()) == ws


def test_notice_ids_tell_a_failure_from_a_delay_warning_of_the_same_round() -> None:
    assert notice_id("m-0", 2, delayed=False) != notice_id("m-0", 2, delayed=True)
    assert notice_id("m-0", 2, delayed=False) != notice_id("m-0", 3, delayed=False)


def test_flush_requests_round_trip_and_refuse_garbage() -> None:
    request = FlushRequest("0193abc", "0193def")
    assert FlushRequest.from_json(request.to_json()) == request
    for bad in (b"", b"[]", b'{"v": 1}', b'{"v": 2, "message_id": "m", "window": "w"}', b"\xff"):
        with pytest.raises(ValueError):
            FlushRequest.from_json(bad)
