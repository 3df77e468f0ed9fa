"""The disk a targets build needs: checked before any search, then again as chunks come, from the support measured.

A position's row holds one entry per distinct next token among its k neighbours: at most k, typically a tenth to a
third of it (docs/scaling.md), and which is only known once searched. Refusing on the worst case made a user lower
k or max_support, the method's settings, to pass a check the run would have passed; so the worst case only warns,
the run is refused before any search when even one entry a position would not fit, and :class:`TargetsDiskWatch`
stops it, its chunks kept for a resume, once the support measured so far says the rest will not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from lightning_memdec.io.artifact_dirs import partial_dir
from lightning_memdec.io.capacity import allocated_bytes, check_fits, free_disk, size_text
from lightning_memdec.stages.chunked_predict import IN_FLIGHT

log = logging.getLogger(__name__)
ENTRY_BYTES = 4 + 2  # an id (int32) and a probability (fp16)
POSITION_BYTES = 8  # a chunk's count, or the merged offset, per position


def targets_disk_bytes(num_positions: int, support: float) -> int:
    """Peak bytes on disk of a targets build at ``support`` entries a position: every chunk's CSR pieces are still
    there when the merge has written the same entries again into ids/probs/offsets."""
    return 2 * copy_bytes(num_positions, support)


def copy_bytes(num_positions: int, support: float) -> int:
    """One copy of the targets: the chunk files', or the merged CSR's."""
    return round(num_positions * support * ENTRY_BYTES) + POSITION_BYTES * (num_positions + 1)


def check_disk(out: Path, num_positions: int, support: int, watched: bool = True) -> None:
    """Before any search: refused when even one entry a position would not fit; a warning when ``support`` (k, or
    max_support) entries would not, as the run then depends on the support it measures (a resumed run counts what
    it has written). Not ``watched`` (the ranks search every chunk together, where one rank's stop would leave the
    others waiting): refused on the worst case."""
    work = partial_dir(out)
    written = sum(allocated_bytes(f) for f in work.rglob("*") if f.is_file()) if work.is_dir() else 0
    free = free_disk(out)
    least = 1 if watched else support
    check_fits(
        targets_disk_bytes(num_positions, least) - written,
        free,
        f"the targets for {num_positions:,} positions (chunk files + merged CSR) in {out}, at {least} "
        f"entr{'y' if least == 1 else 'ies'} a position,",
        "free disk space or choose an --out on a larger file system"
        + ("." if watched else ", or lower --knn.max_support (the run is not watched with --search.shard_keys)."),
    )
    worst = targets_disk_bytes(num_positions, support) - written
    if worst > free:
        log.warning(
            "the targets for %s positions need up to %s in %s (%d entries a position, chunk files + merged CSR), "
            "%s is free: the run goes on, and stops (resumable) once the support it measures says they will not fit.",
            f"{num_positions:,}", size_text(worst), out, support, size_text(free),
        )  # fmt: skip


class TargetsDiskWatch(L.Callback):
    """After each chunk a rank searches: the bytes still to come (its chunks not yet on disk, ``unsaved`` of them
    still being saved by its writer; the other ranks' alike; the merged copy), at the mean support this rank has
    measured, must fit the free disk; else the run stops with a :class:`~io.capacity.ResourceError` naming them,
    its saved chunks kept (the same command resumes). Each chunk left is counted as ``chunk_size`` positions: a
    resume's gaps between finished ranges may leave shorter ones, so it is a bound, never short."""

    def __init__(self, work: Path, num_positions: int, chunk_size: int, unsaved: int = IN_FLIGHT):
        self.work, self.num_positions, self.chunk_size, self.unsaved = work, num_positions, chunk_size, unsaved
        self.positions, self.entries = 0, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is None:  # an idle rank's step, or a key shard's rank that does not own the chunk
            return
        self.positions += len(outputs["counts"])
        self.entries += int(outputs["counts"].sum())
        support = self.entries / self.positions
        chunks_left = trainer.num_predict_batches[dataloader_idx] - batch_idx - 1 + self.unsaved
        positions_left = min(self.num_positions, chunks_left * trainer.world_size * self.chunk_size)
        needed = copy_bytes(positions_left, support) + copy_bytes(self.num_positions, support)
        check_fits(
            needed,
            free_disk(self.work),
            f"at the {support:.1f} entries a position measured over {self.positions:,} positions, the rest of the "
            f"targets (about {positions_left:,} positions' chunks, then the merged CSR of {self.num_positions:,})",
            "free disk space and run the same command again (it resumes from the chunks saved), or choose an --out "
            "on a larger file system.",
        )
