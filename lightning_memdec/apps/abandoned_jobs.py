"""Jobs whose client went away, told to the inference worker so that it ends their rows.

LitServe cannot take a queued job back: the row of a client that disconnected was decoded to its ``max_tokens``,
holding its batch (and every request queued behind it) that long. The HTTP process marks such a job with an empty file
named by the job's uid in a directory it shares with the worker; the worker's per-row end test looks for the file each
step (one ``unlink`` that finds nothing, mostly) and so removes it once seen. Marks the worker never sees (a job that
ended meanwhile) go with the directory when the server stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass


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
        """The job ``uid``'s client is gone."""
        with open(self._path(uid), "w"):
            pass

    def take(self, uid: str) -> bool:
        """Whether job ``uid`` was abandoned (its mark is removed: it is answered once)."""
        try:
            os.unlink(self._path(uid))
            return True
        except FileNotFoundError:
            return False

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, uid: str) -> str:
        return os.path.join(self.directory, str(uuid.UUID(uid)))  # a uid, never a path of the client's choosing
