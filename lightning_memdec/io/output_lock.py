"""Exclusive outputs: one process at a time builds an artefact (or trains into a run root), others are refused.

The lock is ``fcntl.flock`` on ``<out>.lock`` beside the output: released when the build ends, and by the OS
when its process dies, so a killed run never leaves a stale lock behind. The file records the holder's pid
for the message the second process gets. Only the first process of a distributed job locks: the other ranks
run the same stage into the same ``.partial`` directory on purpose.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import logging
import os
from pathlib import Path

from lightning_memdec.io.artifact_dirs import AlreadyPublished, ArtifactError, check_writable_dir, is_secondary_rank

log = logging.getLogger(__name__)


def lock_path(out: str | Path) -> Path:
    out = Path(os.path.abspath(out))  # "." (a run root in the working directory) has no name of its own
    return out.with_name(out.name + ".lock")


class OutputLock:
    """An exclusive lock on building ``out``; use as ``with OutputLock(out): ...`` or acquire()/release()."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        if self.fd is not None or is_secondary_rank():
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:  # a parent of the output is a file
            raise ArtifactError(
                f"cannot write {self.out}: {err.filename} is a file, not a directory; choose another output path."
            ) from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ArtifactError(
                f"{self.out} is being written by another process (pid {holder}, lock {self.path}); wait for it to "
                "finish, or choose another output."
            ) from None
        if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # the holder released and removed the file between our open and flock: try once more
            return self.acquire()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive_output(stage=None, *, replaces_out: bool = True):
    """Decorator: ``stage`` runs holding the lock on its ``out`` argument, from its first check to publication.

    ``replaces_out``: the stage publishes ``out`` whole (replacing it under --overwrite), so an ``out`` that is or
    holds one of its inputs is refused; False for stages that write files into a directory they keep
    (``@exclusive_output(replaces_out=False)``).
    """
    if stage is None:
        return functools.partial(exclusive_output, replaces_out=replaces_out)
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def locked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # an ``out`` left at its default (quickstart's runs/quickstart) is locked too
        out = bound.arguments.get("out")
        if out is None:
            return stage(*args, **kwargs)
        if replaces_out:
            check_not_an_input(out, {name: v for name, v in bound.arguments.items() if name != "out"})
        if not Path(out).exists():  # under a file, or in a directory this process cannot write: said as the flag
            check_writable_dir(out, "--out")
        with OutputLock(out):
            try:
                return stage(*args, **kwargs)
            except AlreadyPublished as done:  # the same command after a stop inside publish: now it is in place
                log.warning("%s", done)
                return done.out

    return locked


def check_not_an_input(out: str | Path, inputs: dict) -> None:
    """Refuse an output that is (or holds) one of the stage's inputs: publishing it (with --overwrite) would delete
    the input it was built from, and without --overwrite the error would advise exactly that."""
    out = Path(out).resolve()
    if not out.exists():
        return
    for name, value in inputs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, (str, Path)) or not str(v) or not Path(v).exists():
                continue
            if Path(v).resolve() == out or Path(v).resolve().is_relative_to(out):
                raise ArtifactError(
                    f"--out {out} is (or holds) the --{name} input {v}: writing the output there would replace "
                    f"the input it is built from; choose another --out."
                )
