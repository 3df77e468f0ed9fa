"""Jobs whose client went away, told to the inference worker so that it ends their rows.

LitServe cannot take a queued job back: the row of a client that disconnected was decoded to its ``max_tokens``,
holding its batch (and every request queued behind it) that long. The HTTP process marks such a job with an empty file
named by the job's uid in a directory it shares with the worker; the worker's per-row end test looks for the file each
step (one ``unlink`` that finds nothing, mostly) and so removes it once seen. A mark the worker never sees (its job
ended between the client leaving and the mark) is removed by a later mark once older than ``STALE_AFTER_S``, far past
any job's time in the queue, and the rest go with the directory when the server stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass

STALE_AFTER_S = 3600.0  # a mark this old belongs to a job that ended before it was written


@dataclass(frozen=True)
class AbandonedJobs:
    """The marks of abandoned jobs, in ``directory`` (plain data: it crosses LitServe's process boundary)."""

    directory: str

    @classmethod
    def temporary(cls) -> AbandonedJobs:
        """A fresh directory, in memory (``/dev/shm``) where the system has one."""
        shared_memory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        return cls(tempfile.mkdtemp(prefix="memdec-serve-abandoned-", dir=shared_memory))

    def mark(self, uid: str) -> None:
        """The job ``uid``'s client is gone; marks older than ``STALE_AFTER_S`` are removed (they were never seen)."""
        with open(self._path(uid), "w"):
            pass
        self._remove_stale(time.time() - STALE_AFTER_S)

    def take(self, uid: str) -> bool:
        """Whether job ``uid`` was abandoned (its mark is removed: it is answered once)."""
        try:
            os.unlink(self._path(uid))
            return True
        except FileNotFoundError:
            return False

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _remove_stale(self, written_before: float) -> None:
        with os.scandir(self.directory) as marks:
            for mark in marks:
                try:
                    if mark.stat().st_mtime < written_before:
                        os.unlink(mark.path)
                except FileNotFoundError:  # the worker took it meanwhile
                    pass

    def _path(self, uid: str) -> str:
        return os.path.join(self.directory, str(uuid.UUID(uid)))  # a uid, never a path of the client's choosing
