"""What this machine has (available RAM, free disk, free GPU memory) and the one check that a stage's planned bytes
fit it.

A paper-scale run that does not fit fails late and badly: a keys memmap on a full disk dies with SIGBUS hours in, and
FAISS replicas that exceed RAM get a rank OOM-killed mid-search. Stages compute what they will need from N, d and
their settings and call :func:`check_fits` before any work, so the error names the bytes and the setting to change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

GIB = 2**30


class ResourceError(ValueError):
    """A planned run does not fit this machine's RAM or disk; the message says by how much and what to change."""


def available_ram() -> int:
    """Bytes of RAM the kernel says a new allocation can get without swapping (MemAvailable), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_memory(device) -> int:
    """Bytes a new allocation on CUDA ``device`` can get: the driver's free memory plus what this process's caching
    allocator holds unused (reserved − allocated). The driver's figure alone shrinks after every large search, whose
    blocks stay cached, so budgets taken from it would shrink call after call."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def allocated_bytes(path: str | Path) -> int:
    """Bytes a (possibly sparse) file already occupies on disk; 0 when it does not exist."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def check_fits(needed: int, available: int, what: str, fix: str) -> None:
    """Refuse before any work when ``needed`` bytes exceed ``available``, naming both and the setting that fits."""
    if needed > available:
        raise ResourceError(f"{what} needs {size_text(needed)} but only {size_text(available)} is available; {fix}")


def size_text(num_bytes: int) -> str:
    """Bytes in GiB with two decimals, or in MiB below 1 GiB (0.01 GiB needed "but only 0.01 GiB available")."""
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / (1 << 20):.1f} MiB"
