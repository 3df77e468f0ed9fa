"""Resident memory a process holds through its memory maps of one file (Linux /proc/self/smaps)."""

import os
import re
from pathlib import Path

MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def mapped_rss(path) -> int:
    """Bytes of ``path``'s pages resident in this process through its maps (0 when it is not mapped or untouched)."""
    target, total, inside = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if MAPPING.match(line):
            parts = line.split(maxsplit=5)
            inside = len(parts) == 6 and os.path.realpath(parts[5]) == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
