"""The DATA byte budget: reservation accounting, the reader's use of it, and the check at MAIL."""

from __future__ import annotations

import asyncio

from services.ingress.budget import ByteBudget
from services.ingress.data import DataState, read_data
from services.ingress.policy import storage_verdict
from services.ingress.replies import INSUFFICIENT_STORAGE


def test_reservations_add_up_and_are_given_back_once() -> None:
    budget = ByteBudget(100)
    one, two = budget.reservation(), budget.reservation()
    assert one.grow(60) and two.grow(40)
    assert budget.used == 100 and budget.free == 0
    assert not two.grow(1)  # no room: nothing more is reserved
    assert (one.held, two.held, budget.used) == (60, 40, 100)
    one.release()
    one.release()  # every way out of DATA releases; only the first gives anything back
    assert (one.held, budget.used, budget.free) == (0, 40, 60)
    assert two.grow(60) and budget.used == 100
    two.release()
    assert budget.used == 0 and budget.free == 100


def test_no_budget_reserves_without_limit() -> None:
    budget = ByteBudget(0)
    reservation = budget.reservation()
    assert reservation.grow(10**12) and budget.free is None
    reservation.release()
    assert budget.used == 0


async def _read(
    budget: ByteBudget, stream: bytes, size_limit: int | None = None
) -> tuple[DataState, bytes, int]:
    """(state, message, octets still reserved) after reading `stream` in 7-octet pieces."""
    reader = asyncio.StreamReader(limit=1001)
    reservation = budget.reservation()

    async def feed() -> None:
        for i in range(0, len(stream), 7):
            reader.feed_data(stream[i : i + 7])
            await asyncio.sleep(0)

    feeder = asyncio.create_task(feed())
    state, message, _ = await read_data(
        reader, size_limit=size_limit, line_limit=1001, reservation=reservation
    )
    await feeder
    assert bytes(reader._buffer) == b"QUIT\r\n"  # read to the end-of-data line, not past it
    return state, message, reservation.held


async def test_the_reader_reserves_what_arrives() -> None:
    budget = ByteBudget(100)
    body = b"Subject: x\r\n\r\n..dot\r\n" + b"y" * 40 + b"\r\n"
    state, message, held = await _read(budget, body + b".\r\nQUIT\r\n")
    assert state is DataState.NOMINAL and message == body.replace(b"..dot", b".dot")
    assert held == budget.used == len(body)  # as sent: dot-stuffing included


async def test_a_message_without_room_is_read_to_its_end_and_holds_nothing() -> None:
    budget = ByteBudget(100)
    other = budget.reservation()
    assert other.grow(50)
    state, message, held = await _read(budget, b"z" * 30 + b"\r\n" + b"z" * 30 + b"\r\n.\r\nQUIT\r\n")
    assert (state, message, held, budget.used) == (DataState.NO_ROOM, b"", 0, 50)


async def test_a_refused_message_gives_its_reservation_back_at_once() -> None:
    budget = ByteBudget(1000)
    state, _, held = await _read(
        budget, b"z" * 30 + b"\r\n" + b"z" * 30 + b"\r\n.\r\nQUIT\r\n", size_limit=40
    )
    assert (state, held, budget.used) == (DataState.TOO_MUCH, 0, 0)


def test_size_declared_at_mail_against_the_free_room() -> None:
    assert storage_verdict(["SIZE=101", "BODY=8BITMIME"], 100) == INSUFFICIENT_STORAGE
    assert storage_verdict(["size=101"], 100) == INSUFFICIENT_STORAGE
    assert storage_verdict(["SIZE=100"], 100) is None
    assert storage_verdict(["BODY=8BITMIME"], 0) is None  # no SIZE: checked as the octets come
    assert storage_verdict(["SIZE=10000000"], None) is None  # no budget


def test_sessions_that_did_not_authenticate_share_half_or_one_largest_message() -> None:
    budget = ByteBudget(100, largest=30)
    anonymous = budget.reservation(anonymous=True)
    assert budget.anonymous_share == 50
    assert anonymous.grow(50) and not anonymous.grow(1)
    assert budget.room(anonymous=True) == 0 and budget.free == 50
    assert budget.reservation().grow(50), "an account still gets the rest"
    anonymous.release()
    assert (budget.used, budget.anonymous) == (50, 0)
    assert ByteBudget(100, largest=80).anonymous_share == 80, "the largest message still fits"
