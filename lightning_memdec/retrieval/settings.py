"""Typed argument groups of retrieval: the kNN search settings every stage that retrieves shares (targets, kNN-LM rows).

Frozen dataclasses: their fields' docstrings are the help of ``--knn.k``, ``--knn.temperature``, … in every command
that takes them, so a setting and its text exist once; their checks run when they are made, before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not self.k > 0:
            raise ValueError(f"--knn.k must be positive (a whole number of neighbours), got {self.k!r}.")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"--knn.temperature must be a positive finite number, got {self.temperature}.")
        if self.nprobe is not None and not self.nprobe > 0:
            raise ValueError(f"--knn.nprobe must be positive (or omitted for the index's own), got {self.nprobe}.")


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
        if not self.nprobe > 0:
            raise ValueError(f"--plan.nprobe must be positive, got {self.nprobe}.")
        if not self.memory_gb > 0:
            raise ValueError(f"--plan.memory_gb must be positive, got {self.memory_gb}.")
        if self.train_size is not None and not self.train_size > 0:
            raise ValueError(f"--plan.train_size must be positive (or omitted for the plan's), got {self.train_size}.")
