"""Stage 4's chunk files: each chunk's CSR pieces saved atomically by a prediction writer, then merged into the
targets' offsets/ids/probs by rank 0."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lightning_memdec.io.npy_rows import NpyAppender
from lightning_memdec.io.readers import IDS, OFFSETS, PROBS
from lightning_memdec.stages.chunked_predict import BackgroundWriter, mark_done

CHUNKS = "chunks"


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
            tmp = self.dir / f"{chunk:09d}.{name}.tmp.npy"
            np.save(tmp, prediction[name])
            os.replace(tmp, self.dir / f"{chunk:09d}.{name}.npy")
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
