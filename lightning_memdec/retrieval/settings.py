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
