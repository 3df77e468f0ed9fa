"""Stage 4's chunk files: each chunk's CSR pieces saved atomically by a prediction writer, named by the chunk's range
of query positions (``<start>-<stop>.<piece>.npy``), then merged in position order into the targets'
offsets/ids/probs by rank 0."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.npy_rows import NpyAppender, npy_file_problem, save_npy
from lightning_memdec.io.readers import IDS, OFFSETS, PROBS
from lightning_memdec.stages.chunk_ranges import Span, done_ranges, mark_done, range_name, tiling_problem, unmark
from lightning_memdec.stages.chunked_predict import BackgroundWriter

log = logging.getLogger(__name__)
CHUNKS = "chunks"
PIECES = {"counts": None, "ids": np.int32, "probs": np.float16}  # a chunk's files, and their dtypes (None: any int)
SHOWN = 5  # damaged chunks named in the warning


class ChunkFileWriter(BackgroundWriter):
    """Saves each chunk's CSR pieces atomically, then marks the chunk done (on a helper thread: see
    :class:`~stages.chunked_predict.BackgroundWriter`)."""

    def __init__(self, work: Path):
        super().__init__()
        self.dir = work / CHUNKS

    def on_predict_start(self, trainer, pl_module):
        self.dir.mkdir(exist_ok=True)
        super().on_predict_start(trainer, pl_module)

    def save(self, pl_module, prediction: dict) -> None:
        lo, hi = int(prediction["lo"]), int(prediction["hi"])
        for name in ("counts", "ids", "probs"):
            save_npy(chunk_file(pl_module.work, (lo, hi), name), prediction[name])
        mark_done(pl_module.work, lo, hi)


def merge_chunks(work: Path, num_positions: int) -> tuple[int, int]:
    """Concatenate the finished chunks' files, in position order, into offsets/ids/probs; returns (positions, nnz).
    Their ranges must tile [0, ``num_positions``) exactly: a gap or an overlap (markers edited or mixed from outside)
    is refused before anything is written.

    Streamed: a first pass sums the chunks' row counts (one chunk's counts in memory at a time), a second appends each
    chunk's offsets, ids and probs to the three files in order, so memory holds one chunk, never the O(N) arrays
    (offsets alone are 8 bytes per position: 824 MB for 103 M) nor the O(nnz) ones, and no output page stays mapped.
    """
    spans = done_ranges(work)
    problem = tiling_problem(spans, num_positions)
    if problem:
        raise ArtifactError(
            f"the finished chunks in {work / CHUNKS} do not cover the {num_positions:,} query positions once each "
            f"({problem}); run the same command again: its resume drops an overlapping chunk and computes the gaps."
        )
    load = lambda span, name: np.load(chunk_file(work, span, name))
    nnz = 0
    for span in spans:
        counts = load(span, "counts")
        if len(counts) != span[1] - span[0]:
            raise ArtifactError(
                f"{chunk_file(work, span, 'counts')} holds {len(counts)} rows, not {span[1] - span[0]}: run the same "
                "command again (its resume computes a damaged chunk again)."
            )
        nnz += int(counts.sum(dtype=np.int64))
    with (
        NpyAppender(work / OFFSETS, np.int64, length=num_positions + 1) as offsets,
        NpyAppender(work / IDS, np.int32, length=nnz) as ids,
        NpyAppender(work / PROBS, np.float16, length=nnz) as probs,
    ):
        offsets.append(np.zeros(1, dtype=np.int64))
        end = 0
        for span in tqdm(spans, desc="merge targets", unit="chunk"):
            ends = end + np.cumsum(load(span, "counts"), dtype=np.int64)
            offsets.append(ends)
            end = int(ends[-1]) if len(ends) else end
            ids.append(load(span, "ids"))
            probs.append(load(span, "probs"))
    return num_positions, nnz


def chunk_file(work: Path, span: Span, piece: str) -> Path:
    return work / CHUNKS / f"{range_name(*span)}.{piece}.npy"


CHUNK_SUFFIXES = tuple(f".{piece}.npy" for piece in PIECES)  # a chunk's files: <range or number><suffix>


def npy_damage(path: Path, dtype) -> tuple[np.ndarray | None, str | None]:
    """(the array as a read-only map, None) for a whole 1-D ``.npy`` of ``dtype`` (None: any integers); (None, what
    is wrong) otherwise."""
    array, problem = npy_file_problem(path)
    if problem:
        return None, problem
    wanted = None if dtype is None else np.dtype(dtype)
    if array.ndim != 1 or (array.dtype.kind not in "iu" if wanted is None else array.dtype != wanted):
        return None, f"{path.name} is a {array.dtype} array of shape {array.shape}, not 1-D {wanted or 'integers'}"
    return array, None


def chunk_damage(work: Path, span: Span) -> str | None:
    """What is wrong with a finished chunk's files (None: they are whole and agree with each other)."""
    arrays, rows = {}, span[1] - span[0]
    for piece, dtype in PIECES.items():
        arrays[piece], problem = npy_damage(chunk_file(work, span, piece), dtype)
        if problem:
            return problem
    counts, ids, probs = (arrays[piece] for piece in PIECES)
    if len(counts) != rows:
        return f"its counts cover {len(counts)} positions, the chunk has {rows}"
    if len(ids) != len(probs) or int(np.asarray(counts).sum(dtype=np.int64)) != len(ids):
        return f"its counts sum to {int(np.asarray(counts).sum())} entries, its ids hold {len(ids)}, probs {len(probs)}"
    return None


def drop_damaged_chunks(work: Path, num_positions: int) -> list[Span]:
    """At a resume, each finished chunk's files are checked against its marker, before any search: a missing or
    truncated file (damage from outside: a disk error, a manual cleanup; a kill leaves none, the marker is written
    after the files) would otherwise be found by the merge, after the whole search. So is a range past the last
    position or overlapping an earlier one (markers from outside), which the merge would refuse. A damaged chunk
    loses its marker and files, with a warning naming it, and the run computes its positions again. Returns the
    ranges dropped."""
    damaged, end = {}, 0
    for span in done_ranges(work):
        if span[1] > num_positions:
            damaged[span] = f"it ends past the last position, {num_positions:,}"
        elif span[0] < end:
            damaged[span] = f"it overlaps a chunk ending at {end:,}"
        elif problem := chunk_damage(work, span):
            damaged[span] = problem
        else:
            end = span[1]
    if damaged:
        named = "; ".join(f"positions {a}-{b}: {problem}" for (a, b), problem in list(damaged.items())[:SHOWN])
        more = f"; and {len(damaged) - SHOWN} more" if len(damaged) > SHOWN else ""
        log.warning("%d finished chunks in %s are damaged (%s%s); computing them again.",
                    len(damaged), work / CHUNKS, named, more)  # fmt: skip
        unmark(work, damaged)  # first: a kill here leaves no marker without its files
        for span in damaged:
            for piece in PIECES:
                chunk_file(work, span, piece).unlink(missing_ok=True)
    return sorted(damaged)
