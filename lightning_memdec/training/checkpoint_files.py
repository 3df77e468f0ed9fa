"""Checkpoint files a resume can trust: written atomically beside their final name, checked before a resume uses them.

Lightning's own save serialises into memory, writes the bytes to a temporary file in ``$TMPDIR`` and moves it into
place: a rename only when ``$TMPDIR`` shares the checkpoints' file system (else a copy, which a kill or a full disk
cuts short), never fsync'd. :class:`AtomicCheckpointIO` writes ``<name>.tmp`` in the same directory, fsyncs it and
renames it, so ``last.ckpt`` is always a whole checkpoint: the old one or the new one. A checkpoint damaged anyway (a
copy cut short, an older version's save on a full disk) is found by :func:`checkpoint_problem` before a resume loads
it, and :func:`resumable_checkpoint` falls back to the newest one that is whole.
"""

from __future__ import annotations

import errno
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``<path>.tmp`` beside ``path``, fsync, rename: a reader (or a resume) never sees half a file,
    and a failed save (full disk, kill) leaves the previous checkpoint in place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            full = disk_full_cause(err)
            if full is None:
                raise
            raise CheckpointDiskFull(path, full) from err
        finally:
            tmp.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# how a stopped training goes on: what each command that trains needs
RESUME = (
    "run it again to resume from there (`memdec fit`: the same arguments and --ckpt_path last; `memdec quickstart` "
    "and `pretrain-bases` resume by themselves)"
)


class CheckpointDiskFull(OSError, ValueError):
    """A checkpoint save that ran out of disk space. torch reports it as ``RuntimeError: [enforce fail at
    inline_container.cc …] unexpected pos``, the ENOSPC buried mid-traceback; this says what happened and what to do
    (a ValueError too, so ``memdec fit`` prints it as one error line)."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(
            f"no space left on the device while saving checkpoint {path} ({cause}): free space and {RESUME} (with "
            f"no checkpoint in {path.parent} yet, the same command starts afresh). The failed save was removed; the "
            "checkpoints saved before it are whole."
        )
        self.errno = cause.errno  # a caller catching OSError reads ENOSPC; str() stays the message above


def disk_full_cause(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind ``err`` (itself, or what torch's zip writer wrapped), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a whole checkpoint (truncated, or bytes that fail their CRC), or None when it is.

    A ``torch.save`` file is a zip archive: its directory sits at the end (a truncated file has none) and every
    member carries a CRC, so the check reads the bytes without unpickling anything.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"not a whole checkpoint ({type(err).__name__}: {err})"
    return None if bad is None else f"member {bad} fails its CRC check"


def check_checkpoint(path: str | Path) -> None:
    """A checkpoint given by name must be whole: an error naming the file and the fix, not a traceback from deep in
    the restore."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"--ckpt_path {path} is {problem}: the save was cut short (a kill or a full disk). Pass another "
            "checkpoint of the run, or --ckpt_path last to take the newest one that is whole."
        )


def resumable_checkpoint(checkpoint_dir: str | Path) -> Path:
    """What ``--ckpt_path last`` resumes from: ``last.ckpt``, or, when it is damaged, the newest whole checkpoint in
    ``checkpoint_dir`` (with a warning naming both); an error, never a silent restart, when there is none."""
    checkpoint_dir = Path(checkpoint_dir)
    candidates = sorted(
        (p for p in checkpoint_dir.glob("*.ckpt") if p.is_file()),
        key=lambda p: (p.stat().st_mtime_ns, p.name == LAST),
        reverse=True,
    )
    if not (checkpoint_dir / LAST).is_file():
        raise FileNotFoundError(
            f"--ckpt_path last: there is no {LAST} in {checkpoint_dir}, so there is nothing to resume. Give the "
            "run's trainer.default_root_dir (checkpoints are in <root>/checkpoints) or checkpoint.dirpath, pass "
            "--ckpt_path <file.ckpt>, or drop --ckpt_path to start afresh."
        )
    problems = {}
    for candidate in candidates:
        problems[candidate] = checkpoint_problem(candidate)
        if problems[candidate] is None:
            if candidate.name != LAST:
                last = checkpoint_dir / LAST  # damaged, or whole but older: a kill between two saves of one step
                why = problems.get(last) or checkpoint_problem(last) or f"whole but older than {candidate.name}"
                log.warning("--ckpt_path last: %s is %s; resuming from %s, the newest whole checkpoint.", last, why,
                            candidate)  # fmt: skip
            return candidate
    listed = "; ".join(f"{p.name}: {why}" for p, why in problems.items())
    raise ValueError(
        f"--ckpt_path last: no checkpoint in {checkpoint_dir} is whole ({listed}); the saves were cut short (a kill "
        "or a full disk). Free disk space and start afresh without --ckpt_path (move the directory away first)."
    )


LIGHTNING_CHECKPOINT_NAMES = ("best", "hpc")  # --ckpt_path names Lightning itself resolves


def resolve_resume(ckpt_path: str | Path | None, checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint file a run resumes from: ``last`` resolved by :func:`resumable_checkpoint`, a file checked by
    :func:`check_checkpoint`; None when not resuming, or for what Lightning resolves (``best``, ``hpc``, a model
    registry, a URL); a local path that is no file is an error before any work."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        return resumable_checkpoint(checkpoint_dir)
    if Path(ckpt_path).is_file():
        check_checkpoint(ckpt_path)
        return Path(ckpt_path)
    if str(ckpt_path) in LIGHTNING_CHECKPOINT_NAMES or str(ckpt_path).startswith("registry") or "://" in str(ckpt_path):
        return None  # Lightning resolves these (a remote file through fsspec)
    raise FileNotFoundError(
        f"--ckpt_path {ckpt_path}: no such file. Give a checkpoint file, or 'last' (the newest whole checkpoint in "
        f"{checkpoint_dir})."
    )


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, and a save of the final step: a run whose last step falls between two
    validations (or two ``every_n_train_steps`` saves) left ``last.ckpt`` behind the exported decoder, so ``memdec
    test --ckpt_path last`` scored older weights and a longer run replayed the steps after it.

    On SIGTERM (a scheduler's preemption, ``docker stop``), the optimizer step in hand is saved too before Lightning
    stops the run, at the point every ``every_n_train_steps`` save is made, so the resume goes on from that step.
    On one rank only: on several, Lightning stops every rank at the start of the next step, where no callback runs,
    and a save would need every rank; there the newest regular checkpoint is what a resume starts from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_at_sigterm = False  # this run's final checkpoint was saved on SIGTERM
        self.step_seen = -1  # trainer.global_step at the last batch end: a batch that changed it ended a step

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ended_a_step, self.step_seen = trainer.global_step != self.step_seen, trainer.global_step
        if trainer.received_sigterm and trainer.world_size == 1 and ended_a_step:  # not inside an accumulation
            self.save_step(trainer)
            self.saved_at_sigterm = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_step(trainer)
        super().on_train_end(trainer, pl_module)

    def save_step(self, trainer) -> None:
        """Save the current step as this callback's schedule would (top-k by step when nothing is monitored, and
        ``last.ckpt``), unless it is saved already."""
        if not self._should_skip_saving_checkpoint(trainer):  # steps taken since the last save
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:  # a monitored top-k would rank the final step by a stale validation score
                self._save_topk_checkpoint(trainer, candidates)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
