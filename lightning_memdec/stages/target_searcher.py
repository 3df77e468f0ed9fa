"""The LightningModule build_targets runs: each rank searches its query chunks (a FAISS or cuVS index, or exact search
over all keys or its shard of them) and turns the neighbours into the sparse rows as stored, on the device where the
search ran; the chunks go to the writer callback."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lightning_memdec.io.npy_rows import read_rows
from lightning_memdec.io.readers import KEYS, Datastore
from lightning_memdec.kernels.sparse_targets import knn_distributions, stored_rows
from lightning_memdec.kernels.sparse_targets_torch import knn_distributions_torch
from lightning_memdec.retrieval.exact_search import (
    exact_distances,
    exact_search,
    resident_keys,
    squared_norms,
)
from lightning_memdec.retrieval.sharded_search import check_shards_hold_k, key_shard, merge_shards, shard_search
from lightning_memdec.stages.chunked_predict import agree_to_stop, chunk_loader, is_idle
from lightning_memdec.stages.target_inputs import check_finite_rows

log = logging.getLogger(__name__)
VALUES_BLOCK = 1 << 22  # values copied to the search device at a time (16 MiB of int32)


class KNNTargetSearcher(L.LightningModule):
    """Searches one chunk of query positions and turns the neighbours into sparse distributions.

    ``search="faiss"``: the FAISS index (k + 1 neighbours when self-excluding), then the CPU kernel on the host.
    ``search="exact"``: :func:`~retrieval.exact_search.exact_search` on this rank's device (the own id masked
    inside its key block), then on a GPU :func:`~kernels.sparse_targets_torch.knn_distributions_torch` there, so
    only the CSR pieces move to the host (on a CPU device, the CPU kernel).
    """

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
        search: str = "faiss",
        search_memory: int | None = None,
        shard_keys: bool = False,
        selection: str = "auto",
    ):
        super().__init__()
        self.queries_dir, self.store_dir, self.index_dir, self.work = queries, datastore, index, Path(work)
        self.k, self.temperature, self.self_exclude = k, temperature, self_exclude
        self.exact, self.max_support, self.min_prob = exact_distances, max_support, min_prob
        self.chunk_size, self.nprobe, self.use_gpu = chunk_size, nprobe, use_gpu
        self.search, self.search_memory, self.device_values = search, search_memory, None
        self.device_keys = self.device_norms = None  # search="exact" on a GPU: the keys and their ‖k‖², once
        self.shard_keys, self.key_shard = shard_keys, None  # key_shard: this rank's [lo, hi) rows when sharded
        self.selection = selection

    def setup(self, stage: str) -> None:
        self.query_store = Datastore(self.queries_dir)
        self.store = Datastore(self.store_dir)
        if self.shard_keys and self.trainer.world_size > 1:
            check_shards_hold_k(len(self.store), self.trainer.world_size, self.k, self.self_exclude)
            self.key_shard = key_shard(len(self.store), self.trainer.global_rank, self.trainer.world_size)
        if self.search == "faiss":
            from lightning_memdec.retrieval.faiss_index import KeyIndex

            # this rank's GPU: where a faiss GPU build copies the index (use_gpu), where a cuVS index is loaded
            gpu = index_gpu_for_rank(self.trainer)
            self.index = KeyIndex(self.index_dir, use_gpu=self.use_gpu, nprobe=self.nprobe, device=gpu)

    def predict_dataloader(self):
        make_item = lambda lo, hi: {"rows": np.arange(lo, hi)}
        # sharded keys: every rank searches every chunk (against its own keys), so every rank gets every chunk
        every_rank = self.key_shard is not None
        n = len(self.query_store)
        return chunk_loader(self, n, self.chunk_size, self.work, make_item, every_rank=every_rank, unit="positions")

    def predict_step(self, batch, batch_idx):
        if is_idle(batch):
            return None
        rows = batch["rows"].cpu().numpy()
        queries = read_rows(self.query_store.keys, rows[0], rows[-1] + 1)  # not mapped: RSS stays one chunk
        what = "datastore" if self.self_exclude else "query datastore"  # a NaN query would fail the search unnamed
        check_finite_rows(queries, int(rows[0]), f"{what} {self.queries_dir} ({KEYS})")
        if self.search == "faiss":
            found = self.index_rows(queries, rows)
        else:
            neighbours = self.exact_neighbours(queries, rows)
            if self.key_shard is not None:
                agree_to_stop(self)  # every rank searches every chunk (collectives): all stop after the same one
                if int(batch["order"]) % self.trainer.world_size != self.global_rank:
                    return None  # every rank found the same neighbours; the chunk's owner writes its rows
            found = self.distributions(*neighbours)
        counts, tok, prob = found
        return {"lo": int(batch["lo"]), "hi": int(batch["hi"]), "counts": counts, "ids": tok, "probs": prob}

    def search_keys(self):
        """(keys, their ‖k‖² or None) this rank searches: all keys or its shard; resident on a GPU when they fit."""
        keys = self.store.keys if self.key_shard is None else self.store.keys[slice(*self.key_shard)]
        resident = self.device.type == "cuda" or self.selection == "cuvs"  # cuVS reads keys in place
        if resident and self.device_keys is None:  # once per rank, when the keys fit its device
            self.device_keys = resident_keys(keys, self.device)
            self.device_norms = None if self.device_keys is None else squared_norms(self.device_keys)
            log.info("keys %s on %s", "resident" if self.device_keys is not None else "streamed per chunk", self.device)
        return (keys, None) if self.device_keys is None else (self.device_keys, self.device_norms)

    def exact_neighbours(self, queries: np.ndarray, rows: np.ndarray):
        """(distances, ids) of the k nearest: one search over all keys, or each rank's shard then an all-gather."""
        own = rows.astype(np.int64) if self.self_exclude else None
        keys, norms = self.search_keys()
        if self.key_shard is None:
            return exact_search(
                queries, keys, self.k, own, self.device, self.search_memory, key_norms=norms, selection=self.selection
            )
        lo = self.key_shard[0]
        dist, ids = shard_search(
            queries, keys, lo, self.k, own, self.device, self.search_memory, key_norms=norms, selection=self.selection
        )
        return merge_shards(self.all_gather(dist), self.all_gather(ids), self.k)

    def distributions(self, dist: torch.Tensor, ids: torch.Tensor):
        """Exact-search neighbours -> sparse rows as stored: the CPU kernel on the host, the torch one on a GPU."""
        if dist.device.type == "cpu":
            found = knn_distributions(
                dist.numpy(),
                ids.numpy(),
                self.store.values,
                self.temperature,
                None,
                None,
                self.max_support,
                self.min_prob,
            )
            return stored_rows(*found)
        if self.device_values is None or self.device_values.device != dist.device:
            self.device_values = values_on(self.store.values, dist.device)
        tokens = self.device_values[ids.clamp(min=0)]  # a missing neighbour (−1) has distance +inf: weight 0
        return knn_distributions_torch(dist, tokens, self.temperature, self.max_support, self.min_prob, stored=True)

    def index_rows(self, queries: np.ndarray, rows: np.ndarray):
        """The index's neighbours -> sparse rows as stored: a FAISS search and the CPU kernel on the host; a cuVS
        search, the own entry dropped and (on a GPU) the torch kernel, all where the index is."""
        queries = queries.astype(np.float32)
        search_k = self.k + 1 if self.self_exclude else self.k
        if self.index.library == "cuvs":
            dist, ids = self.index.search_tensors(torch.from_numpy(queries), search_k)
            if self.exact:
                dist = exact_distances(torch.from_numpy(queries).to(ids.device), self.store.keys, ids)
            if self.self_exclude:
                dist, ids = nearest_without_own(dist, ids, torch.from_numpy(rows).to(ids.device), self.k)
            return self.distributions(dist, ids)
        dist, ids = self.index.search(queries, search_k)
        if self.exact:
            dist = exact_distances(torch.from_numpy(queries), self.store.keys, torch.from_numpy(ids)).numpy()
        found = knn_distributions(
            dist,
            ids,
            self.store.values,
            self.temperature,
            query_ids=rows.astype(np.int64) if self.self_exclude else None,
            k=self.k,
            max_support=self.max_support,
            min_prob=self.min_prob,
        )
        return stored_rows(*found)


def nearest_without_own(dist: torch.Tensor, ids: torch.Tensor, own: torch.Tensor, k: int):
    """The nearest ``k`` neighbours [n, k] of each row other than the query's own datastore entry ``own`` [n] (by
    id, wherever it sits; distance ties: earlier column first), on the device the search ran on."""
    dist = dist.masked_fill(ids == own[:, None], float("inf"))
    order = dist.argsort(dim=1, stable=True)[:, :k]
    return dist.gather(1, order), ids.gather(1, order)


def values_on(values: np.ndarray, device: torch.device, block: int = VALUES_BLOCK) -> torch.Tensor:
    """The datastore's values [N] int32 on ``device`` (4 bytes per entry there), copied ``block`` at a time so the
    host never holds more than one block (a whole copy would be 412 MB for the paper's 103 M entries)."""
    out = torch.empty(len(values), dtype=torch.int32, device=device)
    for lo in range(0, len(values), block):
        out[lo : lo + block] = torch.from_numpy(read_rows(values, lo, lo + block))
    return out


def index_gpu_for_rank(trainer) -> int | None:
    """The GPU a rank's index goes on (a faiss GPU copy, or a cuVS index): its own (the strategy's root device, else
    its local rank when several ranks share the machine), so N ranks make N copies, not N²; None for one CPU process
    (a FAISS index may shard over all GPUs, a cuVS index goes on the current one)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return device.index or 0
    return trainer.local_rank if trainer.world_size > 1 else None
