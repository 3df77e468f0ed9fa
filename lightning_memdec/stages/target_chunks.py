"""Stage 4's chunk files: each chunk's CSR pieces saved atomically by a prediction writer, then merged into the
targets' offsets/ids/probs by rank 0."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lightning_memdec.io.npy_rows import NpyAppender, npy_file_problem, save_npy
from lightning_memdec.io.readers import IDS, OFFSETS, PROBS
from lightning_memdec.stages.chunked_predict import BackgroundWriter, done_chunks, mark_done, unmark

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
        chunk = int(prediction["chunk"])
        for name in ("counts", "ids", "probs"):
            save_npy(self.dir / f"{chunk:09d}.{name}.npy", prediction[name])
        mark_done(pl_module.work, chunk)


def merge_chunks(work: Path, num_chunks: int) -> tuple[int, int]:
    """Concatenate the chunk files into offsets/ids/probs; returns (positions, nnz).

    Streamed: a first pass sums the chunks' row counts (one chunk's counts in memory at a time), a second appends each
    chunk's offsets, ids and probs to the three files in order, so memory holds one chunk, never the O(N) arrays
    (offsets alone are 8 bytes per position: 824 MB for 103 M) nor the O(nnz) ones, and no output page stays mapped.
    """
    load = lambda c, name: np.load(work / CHUNKS / f"{c:09d}.{name}.npy")
    num_positions, nnz = 0, 0
    for c in range(num_chunks):
        counts = load(c, "counts")
        num_positions, nnz = num_positions + len(counts), nnz + int(counts.sum(dtype=np.int64))
    with (
        NpyAppender(work / OFFSETS, np.int64, length=num_positions + 1) as offsets,
        NpyAppender(work / IDS, np.int32, length=nnz) as ids,
        NpyAppender(work / PROBS, np.float16, length=nnz) as probs,
    ):
        offsets.append(np.zeros(1, dtype=np.int64))
        end = 0
        for c in tqdm(range(num_chunks), desc="merge targets", unit="chunk"):
            ends = end + np.cumsum(load(c, "counts"), dtype=np.int64)
            offsets.append(ends)
            end = int(ends[-1]) if len(ends) else end
            ids.append(load(c, "ids"))
            probs.append(load(c, "probs"))
    return num_positions, nnz


def chunk_file(work: Path, chunk: int, piece: str) -> Path:
    return work / CHUNKS / f"{chunk:09d}.{piece}.npy"


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


def chunk_damage(work: Path, chunk: int, rows: int) -> str | None:
    """What is wrong with a finished chunk's files (None: they are whole and agree with each other)."""
    arrays = {}
    for piece, dtype in PIECES.items():
        arrays[piece], problem = npy_damage(chunk_file(work, chunk, piece), dtype)
        if problem:
            return problem
    counts, ids, probs = (arrays[piece] for piece in PIECES)
    if len(counts) != rows:
        return f"its counts cover {len(counts)} positions, the chunk has {rows}"
    if len(ids) != len(probs) or int(np.asarray(counts).sum(dtype=np.int64)) != len(ids):
        return f"its counts sum to {int(np.asarray(counts).sum())} entries, its ids hold {len(ids)}, probs {len(probs)}"
    return None


def drop_damaged_chunks(work: Path, num_positions: int, chunk_size: int) -> list[int]:
    """At a resume, each finished chunk's files are checked against its marker, before any search: a missing or
    truncated file (damage from outside: a disk error, a manual cleanup; a kill leaves none, the marker is written
    after the files) would otherwise be found by the merge, after the whole search. A damaged chunk loses its marker
    and files, with a warning naming it, and the run computes it again. Returns the chunks dropped."""
    damaged = {}
    for chunk in sorted(done_chunks(work)):
        rows = min(chunk_size, num_positions - chunk * chunk_size)
        problem = chunk_damage(work, chunk, rows) if rows > 0 else "it is past the last chunk"
        if problem:
            damaged[chunk] = problem
    if damaged:
        named = "; ".join(f"chunk {c}: {problem}" for c, problem in list(damaged.items())[:SHOWN])
        more = f"; and {len(damaged) - SHOWN} more" if len(damaged) > SHOWN else ""
        log.warning("%d finished chunks in %s are damaged (%s%s); computing them again.",
                    len(damaged), work / CHUNKS, named, more)  # fmt: skip
        unmark(work, damaged)  # first: a kill here leaves no marker without its files
        for chunk in damaged:
            for piece in PIECES:
                chunk_file(work, chunk, piece).unlink(missing_ok=True)
    return sorted(damaged)
