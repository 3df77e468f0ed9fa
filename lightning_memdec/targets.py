"""kNN training targets: for every query position, the sparse next-token distribution of its neighbours.

p_kNN(y | x) = Σ_{j ∈ N(x), v_j = y} softmax_j(−d(x, k_j) / T), with d the squared L2 distance. Stored
as CSR, position-aligned with the query corpus: row ``i`` is ``ids[offsets[i]:offsets[i+1]]`` with
``probs`` (fp16) sorted by probability. Query chunks are spread over ranks like the datastore's windows;
each rank searches a replica of the index.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from lightning_memdec.artifacts import base_meta, publish, start_work_dir
from lightning_memdec.index import KeyIndex, exact_squared_l2
from lightning_memdec.sharded import chunk_loader, finish_chunks, run_sharded_predict
from lightning_memdec.sparse import knn_distributions
from lightning_memdec.store import IDS, OFFSETS, PROBS, Datastore, check_compatible

CHUNKS = "chunks"
log = logging.getLogger(__name__)


class KNNTargetSearcher(L.LightningModule):
    """Searches one chunk of query positions and turns the neighbours into sparse distributions."""

    def __init__(
        self,
        queries: str,
        datastore: str,
        index: str,
        work: str,
        k: int,
        temperature: float,
        self_exclude: bool,
        exact_distances: bool,
        max_support: int | None,
        min_prob: float | None,
        chunk_size: int,
        nprobe: int | None,
        use_gpu: bool,
    ):
        super().__init__()
        self.queries_dir, self.store_dir, self.index_dir, self.work = queries, datastore, index, Path(work)
        self.k, self.temperature, self.self_exclude = k, temperature, self_exclude
        self.exact, self.max_support, self.min_prob = exact_distances, max_support, min_prob
        self.chunk_size, self.nprobe, self.use_gpu = chunk_size, nprobe, use_gpu

    def setup(self, stage: str) -> None:
        self.query_store = Datastore(self.queries_dir)
        self.store = Datastore(self.store_dir)
        self.index = KeyIndex(self.index_dir, use_gpu=self.use_gpu, nprobe=self.nprobe)

    def predict_dataloader(self):
        n = len(self.query_store)

        def make_item(chunk: int) -> dict:
            rows = np.arange(chunk * self.chunk_size, min(n, (chunk + 1) * self.chunk_size))
            return {"rows": rows}

        return chunk_loader(self, -(-n // self.chunk_size), self.work, make_item)

    def predict_step(self, batch, batch_idx):
        rows = batch["rows"].cpu().numpy()
        queries = np.asarray(self.query_store.keys[rows[0] : rows[-1] + 1], dtype=np.float32)
        search_k = self.k + 1 if self.self_exclude else self.k
        dist, ids = self.index.search(queries, search_k)
        if self.exact:
            dist = exact_squared_l2(queries, self.store.keys, ids)
        counts, tok, prob = knn_distributions(
            dist,
            ids,
            self.store.values,
            self.temperature,
            query_ids=rows.astype(np.int64) if self.self_exclude else None,
            k=self.k,
            max_support=self.max_support,
            min_prob=self.min_prob,
        )
        return {
            "chunk": batch["chunk"],
            "counts": counts,
            "ids": tok.astype(np.int32),
            "probs": prob.astype(np.float16),
        }


class ChunkFileWriter(BasePredictionWriter):
    """Saves each chunk's CSR pieces atomically, then marks the chunk done."""

    def __init__(self, work: Path):
        super().__init__(write_interval="batch")
        self.dir = work / CHUNKS

    def on_predict_start(self, trainer, pl_module):
        self.dir.mkdir(exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from lightning_memdec.sharded import mark_done

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


def build_targets(
    datastore: Path,
    index: Path,
    out: Path,
    queries: Path | None = None,
    k: int = 1024,
    temperature: float = 16.0,
    exact_distances: bool = False,
    max_support: int | None = None,
    min_prob: float | None = None,
    chunk_size: int = 4096,
    nprobe: int | None = None,
    use_gpu: bool = False,
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Build sparse kNN next-token distributions for every position of a corpus.

    Args:
        datastore: the datastore searched (its values are the predicted tokens).
        index: FAISS index over that datastore, from `memdec build-index`.
        out: output targets directory.
        queries: datastore of the positions to build targets for (its keys are the queries); default: the
            searched datastore itself, with each position's own entry excluded by id. Use a datastore of
            the validation split to build validation targets.
        k: neighbours per position (paper: 1024); capped at the store size with a warning.
        temperature: T in softmax(−d/T) over squared L2 distances (paper: 16).
        exact_distances: recompute exact fp32 distances from the stored keys (for IVF-PQ indexes).
        max_support: keep at most this many tokens per position, then renormalise.
        min_prob: drop tokens below this probability, then renormalise.
        chunk_size: query positions per search call; also the resumable chunk.
        nprobe: IVF lists visited per query (default: the index's meta.json).
        use_gpu: search on GPU (faiss-gpu); under several devices each rank uses its own GPU.
        accelerator: Lightning accelerator for spreading chunks over ranks.
        devices: devices (ranks) per node.
        strategy: Lightning strategy (e.g. ddp).
        num_nodes: nodes.
        overwrite: replace an existing output / discard an unfinished run with other settings.
    """
    check_target_settings(k, temperature, max_support, min_prob)
    store = Datastore(datastore)
    query_store = Datastore(queries) if queries is not None else store
    check_compatible(query_store, store)
    key_index = KeyIndex(index)
    key_index.check_datastore(store)
    self_exclude = query_store.identity() == store.identity()
    available = len(store) - (1 if self_exclude else 0)
    if k > available:
        log.warning("k=%d exceeds the %d entries available; using k=%d.", k, available, available)
        k = available
    run_config = {
        "queries": query_store.identity(),
        "datastore": store.identity(),
        "index": key_index.meta["factory"],
        "k": k,
        "temperature": temperature,
        "exact_distances": exact_distances,
        "max_support": max_support,
        "min_prob": min_prob,
        "chunk_size": chunk_size,
        "nprobe": nprobe,
    }
    work = start_work_dir(out, run_config, overwrite)
    paths = (str(query_store.dir), str(store.dir), str(index), str(work))
    settings = (k, temperature, self_exclude, exact_distances, max_support, min_prob, chunk_size, nprobe, use_gpu)
    searcher = KNNTargetSearcher(*paths, *settings)
    trainer = run_sharded_predict(searcher, ChunkFileWriter(work), accelerator, devices, strategy, num_nodes, callbacks)
    if not trainer.is_global_zero:
        return Path(out)
    num_chunks = -(-len(query_store) // chunk_size)
    finish_chunks(work, num_chunks)
    num_positions, nnz = merge_chunks(work, num_chunks)
    shutil.rmtree(work / CHUNKS)
    settings = {k_: run_config[k_] for k_ in ("k", "temperature", "exact_distances", "max_support", "min_prob")}
    settings["nprobe"] = nprobe or key_index.meta["nprobe"]
    return publish(work, out, targets_meta(store, query_store, key_index, num_positions, nnz, self_exclude, settings))


def check_target_settings(k: int, temperature: float, max_support: int | None, min_prob: float | None) -> None:
    """Refuse settings that cannot give distributions, before any search (``not x > 0`` also refuses NaN)."""
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}.")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    if max_support is not None and not max_support > 0:
        raise ValueError(f"max_support must be positive, got {max_support}.")
    if min_prob is not None and not 0 <= min_prob < 1:
        raise ValueError(f"min_prob must be in [0, 1), got {min_prob}.")


def targets_meta(
    store: Datastore, queries: Datastore, index: KeyIndex, num_positions: int, nnz: int, self_excluded: bool, settings
) -> dict:
    """meta.json of a targets directory: what was searched, with which settings, for which corpus and tokenizer."""
    return base_meta(
        "targets",
        num_positions=num_positions,
        nnz=nnz,
        self_excluded=self_excluded,
        index_factory=index.meta["factory"],
        datastore=str(store.dir.resolve()),
        queries=queries.identity(),
        corpus=queries.meta["corpus"],
        corpus_sha256=queries.meta["corpus_sha256"],
        model=store.meta["model"],
        layer=store.meta["layer"],
        tokenizer=store.tokenizer,
        **settings,
    )
