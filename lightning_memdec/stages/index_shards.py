"""`memdec build-index-sharded`: a FAISS index built by several ranks: one trained index, per-chunk shards, merged.

Rank 0 trains the empty index once (:func:`~retrieval.faiss_index.train_on_sample`, the sample and seed of
``build-index``) and saves it in the work directory; every rank then adds its chunks of consecutive keys to copies
of it, saving each chunk's shard (the adding is what takes the time: encoding N keys against the trained tables);
rank 0 merges the shards in key order. Each IVF list then holds its entries in id order, as when one process adds
them all, so the merged index equals the one-process index built on the same trained index, byte for byte.
Chunks are resumable and spread over ranks by :mod:`lightning_memdec.stages.chunked_predict`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import faiss
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from lightning_memdec.io.artifact_dirs import ArtifactError, is_secondary_rank, publish, start_work_dir
from lightning_memdec.io.npy_rows import read_rows
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import INDEX, Datastore, check_finite_keys
from lightning_memdec.retrieval.faiss_index import (
    check_build_fits,
    check_recall_k,
    describe_recall,
    index_meta,
    index_run_settings,
    measured_recall,
    set_nprobe,
    train_on_sample,
)
from lightning_memdec.retrieval.index_plan import IndexPlan, plan_index
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.chunk_ranges import (
    Span,
    convert_number_markers,
    done_ranges,
    drop_progress,
    mark_done,
    range_name,
    tiling_problem,
)
from lightning_memdec.stages.chunked_predict import chunk_loader, finish_chunks, is_idle, run_sharded_predict
from lightning_memdec.stages.settings import Hardware

TRAINED = "trained.faissindex"
SHARDS = "shards"
SHARD_SUFFIX = ".faissindex"


def shard_path(work: Path, span: Span) -> Path:
    return Path(work) / SHARDS / f"{range_name(*span)}{SHARD_SUFFIX}"


class ShardAdder(L.LightningModule):
    """Adds one chunk of keys to a copy of the trained index per step; rank 0 trains it first if nobody has."""

    def __init__(self, datastore: str, work: str, factory: str, train_size: int, seed: int, chunk_keys: int):
        super().__init__()
        self.store_dir, self.work, self.factory = datastore, Path(work), factory
        self.train_size, self.seed, self.chunk_keys = train_size, seed, chunk_keys

    def setup(self, stage: str) -> None:
        self.store = Datastore(self.store_dir)
        trained = self.work / TRAINED
        if self.trainer.is_global_zero and not trained.exists():  # a resumed run keeps the tables it trained
            index = faiss.index_factory(self.store.dim, self.factory, faiss.METRIC_L2)
            train_on_sample(index, self.store, self.train_size, self.seed)
            faiss.write_index(index, str(self.work / ("tmp-" + TRAINED)))
            os.replace(self.work / ("tmp-" + TRAINED), trained)
        self.trainer.strategy.barrier("trained-index")
        self.trained = faiss.read_index(str(trained))

    def predict_dataloader(self):
        return chunk_loader(self, len(self.store), self.chunk_keys, self.work, lambda lo, hi: {}, unit="keys")

    def predict_step(self, batch, batch_idx):
        if is_idle(batch):
            return None
        lo, hi = int(batch["lo"]), int(batch["hi"])
        rows = read_rows(self.store.keys, lo, hi)
        check_finite_keys(rows, lo, f"datastore {self.store_dir}")
        shard = faiss.clone_index(self.trained)
        shard.add(np.ascontiguousarray(rows, dtype=np.float32))
        return {"span": (lo, hi), "shard": shard}


class ShardWriter(BasePredictionWriter):
    """Saves each chunk's shard atomically, then marks the chunk done."""

    def __init__(self, work: Path):
        super().__init__(write_interval="batch")
        self.work = Path(work)

    def on_predict_start(self, trainer, pl_module):
        (self.work / SHARDS).mkdir(exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:  # an idle rank's placeholder step
            return
        path = shard_path(self.work, prediction["span"])
        faiss.write_index(prediction["shard"], str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        mark_done(self.work, *prediction["span"])


def merge_shards(work: Path) -> faiss.Index:
    """The trained index with every chunk's shard appended in key order (ids stay global: the chunk's start + i)."""
    spans = done_ranges(work)
    problem = tiling_problem(spans, spans[-1][1] if spans else 0)
    if problem:
        raise ArtifactError(f"the shards in {work / SHARDS} overlap ({problem}); pass --overwrite to build afresh.")
    index = faiss.read_index(str(work / TRAINED))
    for span in tqdm(spans, desc="merge index shards", unit="shard"):
        shard = faiss.read_index(str(shard_path(work, span)))
        index.merge_from(shard, 0 if is_flat(index) else index.ntotal)  # flat codes: ids are positions already
    return index


def is_flat(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return True
    return False


@exclusive_output
def build_index_sharded(
    datastore: Path,
    out: Path,
    plan: IndexSettings = IndexSettings(),
    chunk_keys: int = 65_536,
    recall_queries: int = 256,
    recall_k: int = 64,
    hardware: Hardware = Hardware(),
    plan_only: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path | IndexPlan:
    """Build a FAISS index over a datastore's keys on several ranks (CPU FAISS): shared training, sharded adding.

    Args:
        datastore: datastore directory from `memdec build-datastore`.
        out: output index directory (the layout and meta.json of `memdec build-index`).
        plan, recall_queries, recall_k: as for `memdec build-index`.
        chunk_keys: consecutive keys per shard; also the resumable chunk.
        hardware: the ranks the shards are spread over (FAISS runs on the host whatever the accelerator).
        plan_only: print the plan (index size, memory, training sample, search cost) and stop.
        overwrite: replace an existing output / discard an unfinished run with other settings.
    """
    store = Datastore(datastore)
    spec = plan  # the settings; ``plan`` becomes the plan made from them
    plan = plan_index(len(store), store.dim, memory_gb=spec.memory_gb, nprobe=spec.nprobe, factory=spec.factory)
    if not is_secondary_rank():
        print(plan.describe(), flush=True)
    if plan_only:
        return plan
    train_size, seed, nprobe = plan.train_size if spec.train_size is None else spec.train_size, spec.seed, spec.nprobe
    check_build_fits(plan, min(len(store), train_size) if plan.train_size else 0, use_gpu=False)
    check_recall_k(recall_queries, recall_k)
    try:
        faiss.index_factory(store.dim, plan.factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {plan.factory!r} for dimension {store.dim}: {err}") from err
    if chunk_keys <= 0:
        raise ValueError(f"--chunk_keys must be positive, got {chunk_keys}.")
    run = index_run_settings(store, "faiss", plan.factory, train_size, seed, nprobe, (recall_queries, recall_k))
    work = start_work_dir(out, run | {"chunk_keys": chunk_keys}, overwrite)
    if not is_secondary_rank():  # an earlier version's run marked its chunks by number
        convert_number_markers(work, chunk_keys, len(store), work / SHARDS, (SHARD_SUFFIX,))
    adder = ShardAdder(str(datastore), str(work), plan.factory, train_size, seed, chunk_keys)
    hw = hardware
    trainer = run_sharded_predict(
        adder, ShardWriter(work), work, hw.accelerator, hw.devices, hw.strategy, hw.num_nodes, callbacks
    )
    if not trainer.is_global_zero:
        return Path(out)
    finish_chunks(work, len(store), "keys")
    index = merge_shards(work)
    set_nprobe(index, nprobe)
    recall = measured_recall(index, store, recall_queries, recall_k, seed) if recall_queries > 0 else None
    if recall is not None:
        print(describe_recall(recall), flush=True)
    faiss.write_index(index, str(work / INDEX))
    drop_progress(work)  # before the shards go: markers without their shards would resume into nothing
    shutil.rmtree(work / SHARDS)
    (work / TRAINED).unlink()
    return publish(work, out, index_meta(index, plan, store, train_size, nprobe, recall))
