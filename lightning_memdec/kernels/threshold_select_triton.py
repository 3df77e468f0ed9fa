"""Triton kernels of the exact search on a GPU: the score product fused with the threshold selection, and the exact
re-ranking's distances from gathered keys.

:func:`collect_below_fused` is :func:`kernels.threshold_select.collect_below` applied to ``‖k‖² − 2 q·kᵀ`` without
the score block ever reaching memory: each program multiplies a tile of queries by a tile of keys (fp32
accumulation), forms the tile's scores and appends those under each query's τ to the candidate buffers (one atomic
add a row for the tile's hits, then a prefix sum for their slots). :func:`gathered_sq_distances` computes
Σ (q − k)² in fp32 for [n, m] key ids in one pass over the gathered fp16 rows, where torch's gather, subtract,
square and sum make four passes over an fp32 copy.

Imported only where Triton is installed (on a CUDA machine it comes with torch). The tests run both kernels on the
CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["APPENDS", "Launch", "collect_below_fused", "gathered_sq_distances"]


#: how the hits of a tile find their buffer slots: ``scan``, one atomic add a row for its count, then a prefix sum
#: over the tile's rows; ``atomic``, one atomic add a hit, whose old count is its slot (about 0.2 hits a row a tile at
#: k = 1,024 over 2 M keys, so few atomics, but predicated over the whole tile). Same sets; which is faster is the
#: GPU's to say (benchmarks/gpu.py's threshold_breakdown times both).
APPENDS = ("scan", "atomic")


@dataclass(frozen=True)
class Launch:
    """How the fused kernel is launched (not what it computes): tiles of (queries, keys, d per step), powers of two
    ≥ 16, warps and pipeline stages. Default: 128 × 128 tiles, 64 of d at a time; query tiles are the fastest grid
    axis, so one key tile is read from memory once and reused by every query tile while the queries stay in L2."""

    tiles: tuple[int, int, int] = (128, 128, 64)
    num_warps: int = 8
    num_stages: int = 3
    append: str = "scan"  # how a tile's hits get their slots: see APPENDS


@triton.jit
def _collect_below_kernel(
    q_ptr, k_ptr, norm_ptr, tau_ptr, own_ptr, out_score_ptr, out_id_ptr, count_ptr,
    n, num_keys, dim, k_stride, key_offset, capacity, query_tiles,
    HAS_OWN: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    APPEND_ATOMIC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = (pid % query_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    cols = (pid // query_tiles).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK], int64: N·d can pass 2^31
    row_in, col_in = rows < n, cols < num_keys
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + rows[:, None] * dim + d[None, :], mask=row_in[:, None] & (d[None, :] < dim), other=0.0)
        k = tl.load(k_ptr + cols[None, :] * k_stride + d[:, None], mask=col_in[None, :] & (d[:, None] < dim), other=0.0)
        acc = tl.dot(q, k, acc)  # [BQ, BD] @ [BD, BK]
    norms = tl.load(norm_ptr + cols, mask=col_in, other=0.0)
    score = norms[None, :] - 2.0 * acc  # ‖k‖² − 2 q·k, [BQ, BK]
    tau = tl.load(tau_ptr + rows, mask=row_in, other=float("-inf"))
    ids = tl.broadcast_to(cols[None, :] + key_offset, (BLOCK_Q, BLOCK_K))
    hit = (score <= tau[:, None]) & row_in[:, None] & col_in[None, :]
    if HAS_OWN:  # the query's own key is never a candidate
        own = tl.load(own_ptr + rows, mask=row_in, other=-1)
        hit = hit & (ids != own[:, None])
    hits = hit.to(tl.int32)
    per_row = tl.sum(hits, axis=1)  # [BQ]
    if tl.max(per_row, axis=0) > 0:
        if APPEND_ATOMIC:  # each hit takes the next slot of its row
            slot = tl.atomic_add(count_ptr + tl.broadcast_to(rows[:, None], (BLOCK_Q, BLOCK_K)), hits, mask=hit)
        else:
            start = tl.atomic_add(count_ptr + rows, per_row, mask=per_row > 0)  # this tile's first slot in each row
            slot = start[:, None] + tl.cumsum(hits, axis=1) - 1
        keep = hit & (slot < capacity)
        where = rows.to(tl.int64)[:, None] * capacity + slot
        tl.store(out_score_ptr + where, score, mask=keep)
        tl.store(out_id_ptr + where, ids, mask=keep)


def collect_below_fused(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_norms: torch.Tensor,
    tau: torch.Tensor,
    own: torch.Tensor | None,
    key_offset: int,
    buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    launch: Launch = Launch(),
) -> None:
    """Append to ``buffers`` (:class:`kernels.threshold_select.CandidateBuffers`) every key of ``keys`` [B, d]
    whose ``‖k‖² − 2 q·k`` is ≤ τ [n] of query [n, d] (both fp16: Triton's interpreter, which the tests run it in,
    cannot multiply bf16), except each query's ``own`` id [n] (global ids: key row + ``key_offset``)."""
    n, dim = queries.shape
    if keys.shape[1] != dim or keys.stride(1) != 1:
        raise ValueError(f"keys must be [B, {dim}] with unit column stride, got {tuple(keys.shape)} {keys.stride()}.")
    queries = queries.contiguous()
    scores, ids, counts = buffers
    if launch.append not in APPENDS:
        raise ValueError(f"launch.append must be one of {APPENDS}, got {launch.append!r}.")
    block_q, block_k, block_d = launch.tiles
    query_tiles = triton.cdiv(n, block_q)
    grid = (query_tiles * triton.cdiv(keys.shape[0], block_k),)
    _collect_below_kernel[grid](
        queries, keys, key_norms, tau, counts if own is None else own, scores, ids, counts,
        n, keys.shape[0], dim, keys.stride(0), key_offset, scores.shape[1], query_tiles,
        HAS_OWN=own is not None, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
        APPEND_ATOMIC=launch.append == "atomic", num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip


@triton.jit
def _gathered_sq_distances_kernel(
    q_ptr, k_ptr, id_ptr, out_ptr, m, dim, k_stride, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] candidate columns of this query
    c_in = c < m
    ids = tl.load(id_ptr + row * m + c, mask=c_in, other=-1)
    found = ids >= 0
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + row * dim + d, mask=d < dim, other=0.0)
        k = tl.load(k_ptr + ids[:, None] * k_stride + d[None, :], mask=found[:, None] & (d[None, :] < dim), other=0.0)
        diff = k.to(tl.float32) - q[None, :]  # [BC, BD]
        acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + row * m + c, tl.where(found, acc, float("inf")), mask=c_in)


def gathered_sq_distances(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ (q − k_id)² in fp32 [n, m] for fp32 queries [n, d], keys [N, d] (any float dtype, where the queries are) and
    ids [n, m] int64 (+inf where an id is −1)."""
    n, m = ids.shape
    if keys.stride(1) != 1:
        raise ValueError(f"keys must have unit column stride, got {keys.stride()}.")
    out = torch.empty(n, m, dtype=torch.float32, device=queries.device)
    grid = (n, triton.cdiv(m, 64))
    _gathered_sq_distances_kernel[grid](
        queries.contiguous(), keys, ids.contiguous(), out, m, queries.shape[1], keys.stride(0), BLOCK_C=64, BLOCK_D=64
    )
    return out
