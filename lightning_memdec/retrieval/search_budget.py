"""How much memory one exact search may use (:func:`memory_budget`), how many extra candidates its exact re-ranking
keeps (:func:`rerank_margin`), and the key blocks that fit the budget (:func:`block_rows`), refused up front where not
even one fits (:func:`check_search_budget`). Used by :func:`~lightning_memdec.retrieval.exact_search.exact_search`,
and by build_targets' and the kNN-LM's checks before any work."""

from __future__ import annotations

import torch

from lightning_memdec.io.capacity import free_device_memory

__all__ = [
    "DEFAULT_CPU_MEMORY",
    "GPU_MEMORY_FRACTION",
    "block_rows",
    "check_search_budget",
    "memory_budget",
    "rerank_margin",
    "search_fits",
]

DEFAULT_CPU_MEMORY = 1 << 30  # bytes of RAM one exact search may use on the CPU (per rank)
GPU_MEMORY_FRACTION = 0.5  # of the device's free memory at the start of a search


def memory_budget(device: torch.device | str, memory_bytes: int | None = None) -> int:
    """Bytes one search may use: ``memory_bytes`` if given, else half the free GPU memory (the cache of earlier
    searches counted free: every chunk's search gets the same blocks), or :data:`DEFAULT_CPU_MEMORY` on the CPU."""
    if memory_bytes is not None:
        if memory_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {memory_bytes}.")
        return int(memory_bytes)
    device = torch.device(device)
    if device.type == "cuda":
        return int(free_device_memory(device) * GPU_MEMORY_FRACTION)
    return DEFAULT_CPU_MEMORY


def rerank_margin(k: int, compute_dtype: torch.dtype) -> int:
    """Extra candidates kept for the exact fp32 re-ranking: more where the products or scores are coarser (bf16)."""
    return 16 + k // 4 if compute_dtype == torch.bfloat16 else 8 + k // 16


def _block_bytes(num_queries: int, dim: int, candidates: int, compute_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes per key row of a block, fixed bytes) of one search's working set: see :func:`block_rows`."""
    c = compute_dtype.itemsize
    per_row = dim * (2 + 2 + c + 4) + 12 * num_queries
    fixed = num_queries * dim * (2 + 4 + c) + 48 * num_queries * candidates
    return per_row, fixed


def block_rows(num_queries: int, dim: int, candidates: int, memory_bytes: int, compute_dtype: torch.dtype) -> int:
    """Keys per block so that one block's working set fits ``memory_bytes`` (at least 1).

    Per key row: the fp16 block and its compute-dtype copy, an fp32 temporary for ‖k‖², and the fp32 distance
    column [n] with its top-k workspace; fixed: the queries (fp32 + compute copy) and the running top-k.
    """
    per_row, fixed = _block_bytes(num_queries, dim, candidates, compute_dtype)
    return max(1, (memory_bytes - fixed) // per_row)


def search_fits(num_queries: int, dim: int, candidates: int, memory_bytes: int, compute_dtype: torch.dtype) -> bool:
    """Whether ``memory_bytes`` hold the queries, the running top-``candidates`` and one key row."""
    per_row, fixed = _block_bytes(num_queries, dim, candidates, compute_dtype)
    return fixed + per_row <= memory_bytes


def check_search_budget(
    num_queries: int, dim: int, candidates: int, memory_bytes: int, compute_dtype: torch.dtype
) -> None:
    """Refuse, before any key is read, a budget that cannot hold the queries, the running top-``candidates`` and one
    key row: :func:`block_rows` would otherwise exceed it silently. The message gives the chunk size that fits."""
    if search_fits(num_queries, dim, candidates, memory_bytes, compute_dtype):
        return
    per_row, fixed = _block_bytes(num_queries, dim, candidates, compute_dtype)
    per_query = _block_bytes(1, dim, candidates, compute_dtype)[1] + 12  # what each query adds to fixed + per_row
    fits = (memory_bytes - _block_bytes(0, dim, candidates, compute_dtype)[0]) // per_query
    raise ValueError(
        f"exact search of {num_queries:,} queries × {candidates} candidates (k + re-ranking margin) × d={dim} needs "
        f"{(fixed + per_row) / 2**20:.1f} MiB before its first key block, over the {memory_bytes / 2**20:.1f} MiB "
        f"budget; use --search.chunk_size ≤ {max(0, fits):,} or --search.memory_gb ≥ {(fixed + per_row) / 2**30:.4f}"
        + (" (not even one query fits: lower k)." if fits < 1 else ".")
    )
