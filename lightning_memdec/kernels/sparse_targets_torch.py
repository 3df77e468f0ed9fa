"""Neighbours -> sparse next-token distributions in torch, where the search ran (a GPU; CPU for the tests).

The same rows as :func:`kernels.sparse_targets.knn_distributions` (the CPU kernel that follows a FAISS search on
the CPU): weights exp of :func:`kernels.scoring.knn_scores` (softmax over −d/T), summed per distinct token,
sorted by probability (ties: smaller token id first), truncated by ``max_support`` then ``min_prob`` (each followed
by renormalisation), zero-probability tokens dropped. Only the CSR pieces leave the device.

Per-token sums are a segmented inclusive scan over each token-sorted row (log2(k) vectorised steps, float64):
deterministic on a GPU, unlike an atomic scatter-add, so a resumed run gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_memdec.kernels.scoring import knn_scores

__all__ = ["knn_distributions_torch"]


@torch.no_grad()
def knn_distributions_torch(
    distances: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    max_support: int | None = None,
    min_prob: float | None = None,
    stored: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse rows p(y) = Σ_{j: tokens_j = y} softmax_j(−d_j / T) from ``distances`` [n, k] (squared L2, +inf for a
    neighbour to ignore) and ``tokens`` [n, k] (the neighbours' values), both on one device.

    Returns host CSR arrays like ``knn_distributions``: counts [n] int64, token ids [nnz] int32, probs [nnz]
    float32, each row sorted by prob descending (ties: smaller token id) and summing to 1. Raises ValueError for a
    row whose nearest distance is NaN, -inf or +inf (no neighbour). ``stored``: the rows as
    :func:`kernels.sparse_targets.stored_rows` makes them for the disk (fp16 probs, entries fp16 rounds to 0 dropped,
    rows renormalised), made on the device: the host's numpy pass over every entry is left out of the chunk's serial
    time, and half the bytes cross to the host.
    """
    if distances.ndim != 2 or tokens.shape != distances.shape:
        raise ValueError(f"distances and tokens must both be [n, k]; got {distances.shape} and {tokens.shape}")
    n, width = distances.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    d = distances.float()
    d_min = d.amin(dim=1, keepdim=True)  # NaN propagates, so this also validates d
    bad = ~torch.isfinite(d_min[:, 0])
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {row} has a NaN or -inf distance (or no finite one)")
    weight = knn_scores(d, temperature, nearest=d_min).exp_()
    tok, perm = tokens.long().sort(dim=1, stable=True)
    weight = weight.gather(1, perm).double()
    start = torch.ones_like(tok, dtype=torch.bool)
    start[:, 1:] = tok[:, 1:] != tok[:, :-1]
    run = start.cumsum(1)
    step = 1
    while step < width:  # inclusive segmented scan: each run's last element ends up holding the run's sum
        same = run[:, step:] == run[:, :-step]
        weight[:, step:] = weight[:, step:] + torch.where(same, weight[:, :-step], 0.0)
        step *= 2
    end = torch.ones_like(start)
    end[:, :-1] = start[:, 1:]
    sums = torch.where(end, weight, 0.0)
    probs = (sums / sums.sum(1, keepdim=True)).float()
    keep = end & (probs > 0)  # zero-probability runs go, as nonzero() does
    probs, order = torch.where(keep, probs, -1.0).sort(dim=1, descending=True, stable=True)  # runs are token-sorted
    tok = tok.gather(1, order)
    rank = torch.arange(width, device=d.device)[None, :]
    keep_n = keep.sum(1)
    probs = probs.clamp_min_(0.0)
    if max_support is not None:
        keep_n = keep_n.clamp(max=max_support)
    if min_prob is not None:
        kept = torch.where(rank < keep_n[:, None], probs, 0.0)
        renorm = kept / kept.sum(1, keepdim=True)
        keep_n = ((renorm >= min_prob) & (rank < keep_n[:, None])).sum(1).clamp(min=1)
    inside = rank < keep_n[:, None]
    if max_support is not None or min_prob is not None:
        probs = torch.where(inside, probs, 0.0)
        probs /= probs.sum(1, keepdim=True)
    if stored:
        return _stored_rows(tok, probs, inside)
    return (
        keep_n.cpu().numpy().astype(np.int64),
        tok[inside].to(torch.int32).cpu().numpy(),
        probs[inside].cpu().numpy(),
    )


def _stored_rows(tok: torch.Tensor, probs: torch.Tensor, inside: torch.Tensor):
    """``stored_rows``' rule on padded [n, k] rows: where any entry rounds to 0 in fp16, those entries go and every
    row is divided by its kept sum (accumulated in float64, divided in fp32, as its numpy bincount does)."""
    keep = inside & (probs.half() > 0)
    if not torch.equal(keep, inside):
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.double().sum(1, keepdim=True).float()
    return (
        keep.sum(1).cpu().numpy().astype(np.int64),
        tok[keep].to(torch.int32).cpu().numpy(),
        probs[keep].half().cpu().numpy(),
    )
