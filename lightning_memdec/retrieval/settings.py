"""Typed argument groups of retrieval: the kNN search settings every stage that retrieves shares (targets, kNN-LM rows).

Frozen dataclasses: their fields' docstrings are the help of ``--knn.k``, ``--knn.temperature``, … in every command
that takes them, so a setting and its text exist once; their checks run when they are made, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_memdec.io.settings import check_positive


@dataclass(frozen=True)
class KNNSearch:
    """kNN search: neighbours per query, the softmax temperature over their distances, and how distances are got."""

    k: int = 1024
    """neighbours per query (paper: 1024)"""
    temperature: float = 16.0
    """T in softmax(−d/T) over squared L2 distances (paper: 16)"""
    exact_distances: bool = False
    """recompute exact fp32 distances from the stored keys (IVF-PQ distances are approximate)"""
    nprobe: int | None = None
    """IVF lists visited per query (default: the index's meta.json)"""

    def __post_init__(self):
        check_positive("--knn.k", self.k, whole=True)
        check_positive("--knn.temperature", self.temperature)
        check_positive("--knn.nprobe", self.nprobe, whole=True, omitted="the index's own")


@dataclass(frozen=True)
class IndexSettings:
    """A FAISS index to build: its layout (or the plan's), the training sample, and the lists probed per query."""

    factory: str = "auto"
    """FAISS index factory string (Flat, IVF1024,PQ32, …) or auto: planned from N, d and the memory budget (see
    retrieval.index_plan)"""
    train_size: int | None = None
    """keys sampled (seeded, across the whole store) to train an IVF index; default: the plan's 39–256 per list
    within memory_gb"""
    memory_gb: float = 8.0
    """RAM budget for the training sample (read across the store, one bounded window at a time)"""
    nprobe: int = 32
    """IVF lists visited per query; stored in meta.json and applied on load"""
    seed: int = 0
    """sampling seed for the training keys and the recall queries"""

    def __post_init__(self):
        check_positive("--plan.nprobe", self.nprobe, whole=True)
        check_positive("--plan.memory_gb", self.memory_gb)
        check_positive("--plan.train_size", self.train_size, whole=True, omitted="the plan's")
