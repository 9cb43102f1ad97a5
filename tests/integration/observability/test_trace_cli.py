"""`relais trace <id>` prints the span tree of a message from the JSON-lines trace file."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from services.core.telemetry import JsonLinesExporter
from tests.support.relais import REPO, RelaisStack, asubmit, message, wait_for_events
from tests.support.spans import collecting


async def trace(asked: str, path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "trace",
        asked,
        "--file",
        str(path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    return proc.returncode or 0, out


async def test_trace_prints_the_tree_of_a_delivered_message(
    stack: RelaisStack, make_sink, tmp_path: Path
) -> None:
    path = tmp_path / "traces.jsonl"
    sink = make_sink("127.0.0.2")
    with collecting(JsonLinesExporter(path)):
        code, reply = await asubmit(stack.smtp_address, recipients=["r@alpha.test"], data=message())
        assert code == 250
        mid = reply.decode().rsplit(" ", 1)[-1]
        await sink.async_wait_for(1)
        await wait_for_events(stack.config.nats.url, "delivered", 1)
        for _ in range(50):  # the delivery span ends just after its delivered event is acked
            if "process relais.deliver" in path.read_text():
                break
            await asyncio.sleep(0.1)

    returncode, out = await trace(mid, path)
    assert returncode == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("trace ") and "spans" in lines[0]
    assert "smtp receive" in lines[1] and f"message_id={mid}" in lines[1] and "account=acme" in lines[1]
    names = [re.search(r"s  [│├└─ ]*(.+?)  \[", line).group(1) for line in lines[1:] if line.startswith("+")]
    assert names.index("send relais.submit") < names.index("process relais.submit")
    assert names.index("process relais.submit") < names.index("send relais.deliver.default")
    deliver = next(line for line in lines if "process relais.deliver.default" in line)
    assert "outcome=delivered" in deliver and "code=250" in deliver and " ms" in deliver
    assert any("• delivered 250" in line for line in lines)
    # Indentation grows along the chain: the delivery attempt sits deeper than the route step.
    route = next(line for line in lines if "process relais.submit" in line)
    assert deliver.index("process") > route.index("process")

    # The job key a log line names, copied with its brackets, finds the same message's tree.
    assert await trace(f"<{mid.upper()}-0>", path) == (0, out)

    returncode, out = await trace("nope", path)
    assert returncode == 1 and "no spans for nope" in out


def test_the_trace_file_rotates_and_both_generations_are_read(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from services.admin.trace import load_spans, trace_files

    path = tmp_path / "traces.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path, max_bytes=2000)))
    tracer = provider.get_tracer("test")
    for i in range(20):
        with tracer.start_as_current_span(f"span {i}", attributes={"relais.message_id": f"m{i}"}):
            pass
    provider.shutdown()
    files = trace_files(path)
    assert [f.name for f in files] == ["traces.jsonl.1", "traces.jsonl"]
    assert all(f.stat().st_size < 4000 for f in files)
    names = [s["name"] for s in load_spans(files)]
    assert names[-1] == "span 19" and len(names) < 20, "older generations are dropped"
    assert names == sorted(names, key=lambda n: int(n.split()[1]))
