"""Stage 4's chunk files: each chunk's CSR pieces saved atomically by a prediction writer, then merged into the
targets' offsets/ids/probs by rank 0."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from lightning_memdec.sharded import mark_done
from lightning_memdec.store import IDS, OFFSETS, PROBS

CHUNKS = "chunks"


class ChunkFileWriter(BasePredictionWriter):
    """Saves each chunk's CSR pieces atomically, then marks the chunk done."""

    def __init__(self, work: Path):
        super().__init__(write_interval="batch")
        self.dir = work / CHUNKS

    def on_predict_start(self, trainer, pl_module):
        self.dir.mkdir(exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:  # an idle rank's placeholder step
            return
        chunk = int(prediction["chunk"])
        for name in ("counts", "ids", "probs"):
            tmp = self.dir / f"{chunk:09d}.{name}.tmp.npy"
            np.save(tmp, prediction[name])
            os.replace(tmp, self.dir / f"{chunk:09d}.{name}.npy")
        mark_done(pl_module.work, chunk)


def merge_chunks(work: Path, num_chunks: int) -> tuple[int, int]:
    """Concatenate the chunk files into offsets/ids/probs memmaps; returns (positions, nnz)."""
    chunk_dir = work / CHUNKS
    counts = np.concatenate([np.load(chunk_dir / f"{c:09d}.counts.npy") for c in range(num_chunks)])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nnz = int(offsets[-1])
    np.save(work / OFFSETS, offsets)
    ids = open_memmap(work / IDS, mode="w+", dtype=np.int32, shape=(nnz,))
    probs = open_memmap(work / PROBS, mode="w+", dtype=np.float16, shape=(nnz,))
    pos = 0
    for c in tqdm(range(num_chunks), desc="merge targets", unit="chunk"):
        chunk_ids = np.load(chunk_dir / f"{c:09d}.ids.npy")
        ids[pos : pos + len(chunk_ids)] = chunk_ids
        probs[pos : pos + len(chunk_ids)] = np.load(chunk_dir / f"{c:09d}.probs.npy")
        pos += len(chunk_ids)
    ids.flush()
    probs.flush()
    return len(counts), nnz
