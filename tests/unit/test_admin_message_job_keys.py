"""`relais message` takes what an operator has at hand: a message id (the 250 reply) or a job key
(delivery's and the router's log lines say "job <key>"), as copied: in another case or between
`<>`. A job key shows its message's whole history, the job's own events marked and its fate
last: a job is one recipient domain of a message, and its message's accepted event, other
jobs and DSN belong to the story."""

from __future__ import annotations

from services.admin.history import Lookup, lookup_of, render_history
from services.core.envelope import new_message_id
from services.core.events import Event
from services.router.plan import split_by_domain
from tests.support.relais import an_envelope

SENT = {"code": 250, "enhanced": "2.0.0", "text": "ok"}
LATER = {"code": 451, "enhanced": "4.3.0", "text": "try later"}


def test_a_job_key_as_the_router_makes_it_names_its_message_and_the_job() -> None:
    env = an_envelope("a@alpha.test", "b@beta.test")
    jobs = split_by_domain(env)
    assert len(jobs) == 2
    for job in jobs:
        assert lookup_of(job.job_id) == Lookup(env.id, job.job_id)
    assert lookup_of(env.id) == Lookup(env.id)


def test_an_id_is_read_in_any_case_and_between_angle_brackets() -> None:
    message_id = new_message_id()
    job = f"{message_id}-1"
    for written in (message_id.upper(), f"<{message_id}>", f" <{message_id.upper()}> "):
        assert lookup_of(written) == Lookup(message_id)
    for written in (job.upper(), f"<{job}>"):
        assert lookup_of(written) == Lookup(message_id, job)


def test_what_is_no_relais_id_is_looked_up_as_written() -> None:
    # Only the id format Relais writes is folded: anything else may be some other id, verbatim.
    assert lookup_of("Some-Id-7") == Lookup("Some-Id-7")
    assert lookup_of(f"{new_message_id()}x-1").job_key == ""


def history(message_id: str) -> list[Event]:
    alpha, beta = f"{message_id}-0", f"{message_id}-1"
    both = ["a@alpha.test", "b@beta.test"]
    return [
        Event("accepted", message_id, "acme", both, at=1000.0, sender="s@acme.test"),
        Event("delivered", message_id, "acme", both[:1], at=1001.0, job_id=alpha, attempt=1, reply=SENT),
        Event("deferred", message_id, "acme", both[1:], at=1002.0, job_id=beta, attempt=1, reply=LATER),
    ]


def test_a_jobs_history_marks_its_events_among_its_messages_and_ends_with_its_fate() -> None:
    message_id = new_message_id()
    lines = render_history(message_id, history(message_id), job=f"{message_id}-0").splitlines()

    assert lines[0].startswith(f"message {message_id}  account acme")
    events = [line for line in lines if "1970-01-01" in line]
    assert [line[:2] for line in events] == ["  ", "* ", "  "], lines
    assert "delivered" in events[1]
    assert lines[-2:] == ["still queued: b@beta.test", f"job {message_id}-0: final: delivered"]

    lines = render_history(message_id, history(message_id), job=f"{message_id}-1").splitlines()
    assert lines[-1] == f"job {message_id}-1: still queued: b@beta.test"


def test_a_job_without_events_of_its_own_says_so_and_names_the_jobs_seen() -> None:
    message_id = new_message_id()
    text = render_history(message_id, history(message_id), job=f"{message_id}-7")
    assert text.splitlines()[-1] == (
        f"job {message_id}-7: no events yet (the message's jobs with events: {message_id}-0, {message_id}-1)"
    )


def test_a_message_asked_by_its_id_is_shown_as_before() -> None:
    message_id = new_message_id()
    lines = render_history(message_id, history(message_id)).splitlines()
    assert not any(line.startswith(("* ", "  ")) for line in lines), lines
    assert lines[-1] == "still queued: b@beta.test"
