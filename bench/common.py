"""What the benchmarks share: Postfix's load tools, process accounting, NATS counters, tables.

Everything here drives real processes on loopback; nothing is simulated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.core.embedded import stop_process

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_RELAIS_ID = re.compile(rb"\(Relais\) with \S+ id (\w+);")
_RCPT = re.compile(rb"^X-Rcpt-Args: <?([^>\s]+)", re.MULTILINE)


def ensure_postfix() -> None:
    """Install Debian's postfix (smtp-source, smtp-sink, the MTA) when it is missing."""
    if Path(SMTP_SOURCE).exists() and shutil.which("postfix"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], check=True, env=env)
    # The package's own instance must not run: the benchmark starts its own on 127.0.0.x.
    subprocess.run(["postfix", "stop"], check=False, capture_output=True)


# -- process accounting ----------------------------------------------------------------------


def cpu_split(pid: int, *, reaped: bool = False) -> tuple[float, float]:
    """User and system CPU of a live process (fields 14 and 15 of /proc/<pid>/stat), with its
    reaped children's (fields 16 and 17) when `reaped`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = [int(f) for f in stat.rpartition(")")[2].split()[11:15]]
    user, system = fields[0], fields[1]
    if reaped:
        user, system = user + fields[2], system + fields[3]
    return user / _CLK_TCK, system / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def py_spy() -> str:
    """The py-spy binary, which `--profile` needs and the project does not install."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- the sink: Postfix's smtp-sink, dumping each transaction to its own file ------------------


@dataclass(frozen=True, slots=True)
class Dumped:
    received_at: float
    first_rcpt: str
    relais_id: str


class SmtpSink:
    """`smtp-sink` on host:port; with a dump dir every transaction becomes a file whose mtime is
    the time the message arrived (written at the final dot)."""

    def __init__(self, host: str, port: int, dump_dir: Path | None = None, data_delay: int = 0) -> None:
        self.host = host
        self.port = port
        self.dump_dir = dump_dir
        self.data_delay = data_delay  # seconds before answering DATA (smtp-sink -w), a slow MX
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        args = [SMTP_SINK, "-u", "nobody", "-h", f"sink-{self.host}", "-m", "1000"]
        if self.data_delay:
            args += ["-w", str(self.data_delay)]
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dump_dir, 0o777)
            args += ["-d", f"{self.dump_dir}/%H%M%S."]
        args += [f"{self.host}:{self.port}", "1024"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.host, self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=5)
        self.process = None

    def count(self) -> int:
        if self.dump_dir is None or not self.dump_dir.exists():
            return 0
        return sum(1 for _ in self.dump_dir.iterdir())

    def scan(self) -> list[Dumped]:
        out: list[Dumped] = []
        if self.dump_dir is None:
            return out
        for path in self.dump_dir.iterdir():
            with open(path, "rb") as f:
                head = f.read(8192)
            rcpt = _RCPT.search(head)
            rid = _RELAIS_ID.search(head)
            out.append(
                Dumped(
                    path.stat().st_mtime,
                    rcpt.group(1).decode() if rcpt else "",
                    rid.group(1).decode() if rid else "",
                )
            )
        return out


def _wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    from services.core.embedded import wait_for_port

    wait_for_port(host, port, timeout)


# -- the load: Postfix's smtp-source ------------------------------------------------------------


def smtp_source(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    recipients: int,
    sender: str,
    to: str,
    helo: str = "load.test",
) -> subprocess.Popen[bytes]:
    """smtp-source with a new connection per message (its default), unique recipients (-N)."""
    args = [
        SMTP_SOURCE,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-r",
        str(recipients),
        "-N",
        "-f",
        sender,
        "-t",
        to,
        "-M",
        helo,
        "-S",
        "bench",
        f"{host}:{port}",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# -- NATS monitoring: messages per mail, by client ----------------------------------------------


def connz(monitor_url: str) -> dict[str, tuple[int, int]]:
    """{client name: (messages it published, messages delivered to it)} summed per name."""
    with urllib.request.urlopen(f"{monitor_url}/connz?limit=1024", timeout=5) as resp:
        data = json.load(resp)
    out: dict[str, tuple[int, int]] = {}
    for conn in data.get("connections", []):
        name = conn.get("name") or "?"
        pub, sub = out.get(name, (0, 0))
        out[name] = (pub + int(conn.get("in_msgs", 0)), sub + int(conn.get("out_msgs", 0)))
    return out


# -- output ---------------------------------------------------------------------------------------


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 or v == 0 else f"{v:.2f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def now() -> float:
    return time.time()


def stop_profilers(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
