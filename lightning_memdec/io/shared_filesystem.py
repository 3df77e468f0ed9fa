"""The shared-filesystem requirement of a multi-node run, checked before any work: every rank must see one directory.

The stages' ranks write their chunks and progress markers into one ``.partial`` directory, and rank 0 merges and
publishes what all of them wrote; on a node-local disk each node would see only its own part and the run would end
in "chunks unfinished" after all the compute was spent. So at the start every rank writes a marker there, the
ranks meet at a barrier, and each checks that it sees every rank's marker (waiting a little for network
filesystems whose directory caches lag); all ranks then agree (an all-reduce) and raise together if any saw fewer.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from lightning_memdec.io.artifact_dirs import ArtifactError

MARKER_PREFIX = "rank-"
#: Seconds a rank waits for the other ranks' markers to appear (NFS caches directory entries for a few seconds).
VISIBILITY_WAIT_S = 10.0


def marker(directory: Path, rank: int) -> Path:
    return Path(directory) / f"{MARKER_PREFIX}{rank}"


def sees_all_markers(directory: Path, world_size: int, wait_s: float) -> int:
    """How many of the ranks' markers this process sees, polling until all are there or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = sum(marker(directory, r).exists() for r in range(world_size))
        if seen == world_size or time.monotonic() >= deadline:
            return seen
        time.sleep(0.5)


def check_shared_directory(strategy, directory: Path, setting: str, wait_s: float = VISIBILITY_WAIT_S) -> None:
    """Raise on every rank unless every rank sees the markers all ranks wrote under ``directory``.

    ``strategy``: a Lightning strategy (``world_size``, ``global_rank``, ``barrier``, ``reduce_boolean_decision``).
    ``setting``: the option that chose the directory, named in the error (e.g. ``--out``).
    """
    world_size = strategy.world_size
    if world_size <= 1:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if strategy.global_rank == 0:  # stale markers of an earlier run must not stand in for absent ranks
        for stale in directory.glob(f"{MARKER_PREFIX}*"):
            stale.unlink(missing_ok=True)
    strategy.barrier("shared-filesystem-clear")
    marker(directory, strategy.global_rank).touch()
    strategy.barrier("shared-filesystem-written")
    seen = sees_all_markers(directory, world_size, wait_s)
    everyone = strategy.reduce_boolean_decision(seen == world_size, all=True)
    marker(directory, strategy.global_rank).unlink(missing_ok=True)
    if not everyone:
        raise ArtifactError(
            f"rank {strategy.global_rank} sees {seen} of the {world_size} ranks' markers in {directory} (some rank "
            f"saw fewer): the output ({setting}) must be on a filesystem every node sees (NFS, Lustre, GPFS, ...), "
            f"not a node-local disk such as /tmp; pass {setting} on a shared filesystem (docs/cluster.md)."
        )


class SharedFilesystemCheck(L.Callback):
    """Runs :func:`check_shared_directory` in ``setup``: after the ranks connect, before any model or data loads."""

    def __init__(self, directory: Path, setting: str, wait_s: float = VISIBILITY_WAIT_S):
        self.directory, self.setting, self.wait_s = Path(directory), setting, wait_s

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_shared_directory(trainer.strategy, self.directory, self.setting, self.wait_s)
