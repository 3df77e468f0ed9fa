"""Typed argument groups of the stages: the hardware their ranks run on, sliding windows, kNN target settings.

Frozen dataclasses: their fields' docstrings are the help of the nested flags (``--hardware.devices``,
``--windows.stride``, ``--search.backend``, …) in every command that takes them, so a setting and its text exist
once; their checks run when they are made, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_memdec.io.settings import check_positive
from lightning_memdec.retrieval.exact_search import SEARCH_BACKENDS, SELECTIONS
from lightning_memdec.retrieval.settings import KNNSearch


@dataclass(frozen=True)
class Hardware:
    """Where a stage's ranks run: Lightning's accelerator, devices, strategy and nodes."""

    accelerator: str = "cpu"
    """Lightning accelerator (cpu, gpu, auto)"""
    devices: int | str = 1
    """devices (ranks) per node"""
    strategy: str = "auto"
    """Lightning strategy (e.g. ddp for several devices)"""
    num_nodes: int = 1
    """nodes"""

    def __post_init__(self):
        if not self.num_nodes >= 1:
            raise ValueError(f"--hardware.num_nodes must be at least 1, got {self.num_nodes}.")


@dataclass(frozen=True)
class Windows:
    """Sliding windows over a token stream: their length, the new positions each adds, and how many per pass."""

    window: int = 1024
    """tokens of context per window (paper: 1024)"""
    stride: int | None = None
    """new positions per window (default: half the window, the paper's 512 of 1024); each has >= window - stride + 1
    tokens of context, but the first window's positions, which have what precedes them (windows run across document
    boundaries)"""
    batch_size: int = 8
    """windows per forward pass (build-datastore: also its resumable chunk; a resume may use another)"""
    flag: ClassVar[str] = "--windows"  # the flag group's name in messages (a subclass's own where it is another)

    def __post_init__(self):
        check_positive(f"{self.flag}.window", self.window, whole=True)
        if not 0 < self.step <= self.window:
            raise ValueError(
                f"need 0 < stride <= window, got window={self.window}, stride={self.stride}; "
                f"pass {self.flag}.stride at most {self.flag}.window."
            )
        check_positive(f"{self.flag}.batch_size", self.batch_size, whole=True)

    @property
    def step(self) -> int:
        """The stride in effect: the one given, or half the window. Resolved here, not stored in ``stride``: the
        command line starts from the default instance's fields, so a stored default would not follow a lowered
        ``--windows.window``."""
        return self.stride if self.stride is not None else max(1, self.window // 2)


@dataclass(frozen=True)
class KNNTargets(KNNSearch):
    """kNN search for training targets, and how the neighbours' distribution is pruned."""

    max_support: int | None = None
    """keep at most this many tokens per position, then renormalise"""
    min_prob: float | None = None
    """drop tokens below this probability, then renormalise"""

    def __post_init__(self):
        super().__post_init__()
        check_positive("--knn.max_support", self.max_support, whole=True, omitted="no cap")
        if self.min_prob is not None and not 0 <= self.min_prob < 1:
            raise ValueError(f"--knn.min_prob must be in [0, 1), got {self.min_prob}.")


@dataclass(frozen=True)
class TargetSearch:
    """How the targets' neighbours are searched: the backend, its device and memory, and the chunks of queries."""

    backend: str = "auto"
    """exact (blocked matrix products over all keys on each rank's device, exact fp32 distances, no FAISS), faiss
    (the index: a FAISS one, or a cuVS one built with --library cuvs, searched on the GPU), or auto: exact on a GPU
    up to N·d ≤ 2^33, without an index, or on the CPU when N·(d + 768) ≤ 2^26; else the index"""
    use_gpu: bool = False
    """FAISS search on GPU (faiss-gpu); under several devices each rank uses its own GPU"""
    memory_gb: float | None = None
    """memory one exact search may use per rank (default: half the free GPU memory; 1 GiB of RAM on the CPU); sets
    the key block size, not the result"""
    shard_keys: bool = False
    """with backend exact on several ranks, each rank keeps only N/R of the keys and the ranks merge their exact
    top-k: for stores whose keys do not fit one rank's device; the same targets, at R times the queries per rank"""
    chunk_size: int = 4096
    """query positions per search call; also the resumable chunk (a resume may use another, e.g. lower after an
    out-of-memory error: the finished chunks are kept)"""
    selection: str = "auto"
    """how the exact backend picks each query's candidates: topk (one topk over each key block's scores), threshold
    (the keys under a threshold sampled from the store; on a GPU with Triton a kernel that never writes the score
    block), cuvs (cuVS's brute force over the keys resident on the GPU: pip install -e '.[gpu]'), or auto (threshold
    on the CPU, where it was measured faster; topk on a GPU until measured there); the same neighbours, ties aside"""

    def __post_init__(self):
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"--search.backend must be one of {SEARCH_BACKENDS}, got {self.backend!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"--search.selection must be one of {SELECTIONS}, got {self.selection!r}.")
        check_positive("--search.chunk_size", self.chunk_size, whole=True)
        check_positive("--search.memory_gb", self.memory_gb, omitted="the default budget")
