"""`relais message <job key>` against a real nats-server: the key a log line names a job by
("job <message id>-<n>") finds its message's history in the events stream, with that job's
events marked and its fate last. It found nothing ("no events for ..."), although every event of
a routed job carries the job id."""

from __future__ import annotations

from dataclasses import replace

from services.core.bus import Bus
from services.core.embedded import EmbeddedNats
from services.core.envelope import Attempt, Envelope
from services.core.events import event_for, publish_event
from services.core.outcome import Reply
from services.router.plan import split_by_domain
from tests.integration.test_admin_cli_nats_failures import relais
from tests.support.relais import an_envelope

SENT = Reply(250, "2.0.0", "ok")
LATER = Reply(451, "4.3.0", "try later")


def routed_jobs(message: Envelope) -> list[Envelope]:
    """The message's jobs as the router publishes them: one per recipient domain."""
    return [
        replace(message, job_id=job.job_id, recipients=job.recipients, domain=job.domain, site=job.domain)
        for job in split_by_domain(message)
    ]


async def publish_history(bus: Bus, message: Envelope) -> tuple[str, str]:
    """The message accepted; its alpha.test job delivered, its beta.test job deferred. The keys
    of both jobs."""
    await publish_event(bus, event_for("accepted", message, message.recipients), record=False)
    alpha, beta = routed_jobs(message)
    alpha = alpha.with_attempt(Attempt(1001.0, SENT, "mx.alpha.test"))
    beta = beta.with_attempt(Attempt(1002.0, LATER, "mx.beta.test"))
    await publish_event(bus, event_for("delivered", alpha, alpha.recipients, SENT), record=False)
    await publish_event(bus, event_for("deferred", beta, beta.recipients, LATER), record=False)
    return alpha.key, beta.key


async def test_a_job_key_shows_its_messages_history_with_the_job_marked(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    other = an_envelope("o@gamma.test")
    await publish_event(topology_bus, event_for("accepted", other, other.recipients), record=False)
    message = an_envelope("a@alpha.test", "b@beta.test")
    alpha, beta = await publish_history(topology_bus, message)
    assert (alpha, beta) == (f"{message.id}-0", f"{message.id}-1")

    done = relais("message", alpha, nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"message {message.id}  account acme"), lines
    marked = [line for line in lines if line.startswith("* ")]
    assert len(marked) == 1 and " delivered " in marked[0] and "a@alpha.test" in marked[0], lines
    assert any(" accepted " in line for line in lines) and any(" deferred " in line for line in lines)
    assert "o@gamma.test" not in done.stdout, "another message's events"
    assert lines[-1] == f"job {alpha}: final: delivered", lines

    # As copied from somewhere else: upper case, between angle brackets.
    done = relais("message", f"<{beta.upper()}>", nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"job {beta}: still queued: b@beta.test", done.stdout


async def test_a_message_id_in_upper_case_finds_the_message(
    topology_bus: Bus, nats_server: EmbeddedNats
) -> None:
    message = an_envelope("a@alpha.test", "b@beta.test")
    await publish_history(topology_bus, message)
    done = relais("message", message.id.upper(), nats_url=nats_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "still queued: b@beta.test", done.stdout
    assert not any(line.startswith("* ") for line in done.stdout.splitlines())
