"""A private Postfix instance for the comparison: loopback relay to smtp-sink, default durability.

It lives entirely in its own directory (config, queue, data), listens on one 127.0.0.x:port, and
relays everything from 127.0.0.0/8 to `[relay_host]:relay_port`. Started with
`postfix -c <dir> start` and always stopped again, also when the benchmark fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from services.core.embedded import wait_for_port


def _master_cf(listen: str) -> str:
    """Debian's master.cf with smtpd on `listen` and no chroot (the queue dir is private)."""
    out = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line[:1] in ("#", " ", "\t") or len(fields) < 8:
            out.append(line)
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = listen
        fields[4] = "n"  # chroot
        out.append(" ".join(fields[:7]) + " " + " ".join(fields[7:]))
    return "\n".join(out) + "\n"


class PostfixInstance:
    def __init__(self, base_dir: Path, *, listen: tuple[str, int], relay: tuple[str, int]) -> None:
        self.dir = Path(base_dir)
        self.listen = listen
        self.relay = relay
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"

    def configure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        host, port = self.listen
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.test",
            "mydestination": "",
            # Postfix insists on an address configured on an interface; the listener below binds 127.0.0.x.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{self.relay[0]}]:{self.relay[1]}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "maillog_file": str(self.dir / "maillog"),
            "maillog_file_prefixes": str(self.dir),
            "biff": "no",
        }
        (self.dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.dir / "master.cf").write_text(_master_cf(f"{host}:{port}"))
        # `postfix check` creates the queue tree under queue_directory with the right owners.
        self.queue_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        subprocess.run(["postfix", "-c", str(self.dir), "check"], check=False, capture_output=True)

    def start(self) -> None:
        self.configure()
        done = subprocess.run(["postfix", "-c", str(self.dir), "start"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()}\n{self.log_tail()}")
        wait_for_port(*self.listen, timeout=20)

    def master_pid(self) -> int | None:
        path = self.queue_dir / "pid" / "master.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """The master and its children (smtpd, cleanup, qmgr, smtp, ...)."""
        master = self.master_pid()
        if master is None:
            return []
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return [master, *(int(c) for c in children)]

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.queue_dir / sub
            if d.exists() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True

    def deferred_count(self) -> int:
        d = self.queue_dir / "deferred"
        return sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.dir), "stop"], check=False, capture_output=True)
        master = self.master_pid()
        deadline = time.monotonic() + 10
        while master is not None and Path(f"/proc/{master}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if master is not None and Path(f"/proc/{master}").exists():
            subprocess.run(["postfix", "-c", str(self.dir), "abort"], check=False, capture_output=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "maillog"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def version() -> str:
    out = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True).stdout
    match = re.search(r"=\s*(\S+)", out)
    return match.group(1) if match else "?"
