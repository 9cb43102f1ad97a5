"""Summarise a py-spy `--format raw` profile: where a service's CPU goes, by function.

.venv/bin/python bench/profile_summary.py bench/results/profile-ingress-*.txt
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _key(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(path: Path, top: int = 25) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_key(f) for f in stack.split(";") if f.strip()]
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    lines = [f"{path.name}: {total} samples", "  inclusive%  self%  function"]
    for func, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / total:9.1f}  {100 * own[func] / total:5.1f}  {func}")
    lines.append("  top self time:")
    for func, n in own.most_common(15):
        lines.append(f"  {'':9}  {100 * n / total:5.1f}  {func}")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarise(Path(arg)))
        print()
