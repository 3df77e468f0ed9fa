"""Stage 4's chunk files: each chunk's CSR pieces saved atomically by a prediction writer, then merged into the
targets' offsets/ids/probs by rank 0."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from lightning_memdec.io.npy_rows import NpyAppender
from lightning_memdec.io.readers import IDS, OFFSETS, PROBS
from lightning_memdec.stages.chunked_predict import mark_done

CHUNKS = "chunks"
log = logging.getLogger(__name__)


class ChunkFileWriter(BasePredictionWriter):
    """Saves each chunk's CSR pieces atomically, then marks the chunk done.

    The saves run on a helper thread, one chunk after another, while the next chunk is searched: on a GPU the search
    waits for nothing on the host. At most ``in_flight`` chunks wait to be saved (each holds its rows in memory); the
    end of the run, or an exception in it, waits for them, so every chunk searched is saved and marked (a kill of
    the process loses only the chunks not yet saved, which a resumed run searches again)."""

    def __init__(self, work: Path, in_flight: int = 2):
        super().__init__(write_interval="batch")
        self.dir, self.work, self.in_flight = work / CHUNKS, work, in_flight
        self.saver: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []

    def on_predict_start(self, trainer, pl_module):
        self.dir.mkdir(exist_ok=True)
        self.saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="targets-chunk-saver")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:  # an idle rank's placeholder step
            return
        while len(self.pending) >= self.in_flight:
            self.pending.pop(0).result()  # a failed save raises here, in the run
        self.pending.append(self.saver.submit(self.save, prediction))

    def save(self, prediction: dict) -> None:
        chunk = int(prediction["chunk"])
        for name in ("counts", "ids", "probs"):
            tmp = self.dir / f"{chunk:09d}.{name}.tmp.npy"
            np.save(tmp, prediction[name])
            os.replace(tmp, self.dir / f"{chunk:09d}.{name}.npy")
        mark_done(self.work, chunk)

    def wait(self) -> None:
        """Every submitted chunk saved (the first failure raised after all have finished)."""
        pending, self.pending = self.pending, []
        errors = [f.exception() for f in pending]
        if self.saver is not None:
            self.saver.shutdown(wait=True)
            self.saver = None
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]

    def on_predict_end(self, trainer, pl_module):
        self.wait()

    def on_exception(self, trainer, pl_module, exception):
        try:
            self.wait()  # the chunks searched before the failure are kept for a resumed run
        except Exception as err:  # the run's own exception is the one raised; a failed save's chunk is searched again
            log.warning("a chunk's save failed too (it will be searched again on resume): %s", err)


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
