"""Selection by a per-query threshold: the k best of a wide score block without a ``topk`` over its full rows.

Why: on an H200 the exact search's one ``topk`` a block (1,096 of 1.25 M columns, 4,096 queries) took 99 ms, as
long as the 12.9 TFLOP product before it, and the product itself ran at 12 % of peak because it writes a 20 GB fp32
score block (benchmarks/results/gpu-h200-2026-12-04-fit-search.txt). If each query has a score τ that about
``oversample`` × k keys beat, a key can be kept the moment its score is known (score ≤ τ): a GPU kernel then writes
a few thousand candidates a query instead of every score, and a ``topk`` over that short buffer finishes the job.

τ comes from a systematic sample (every ``stride``-th key): its ``rank``-th best score is beaten by about
``rank × stride`` keys of the whole store, with a relative spread of about 1/√rank. The result stays exact whatever
τ turns out to be: a query whose keys under τ number fewer than k (τ too tight) or more than the buffer holds (too
loose) is searched again the ordinary way (:func:`needs_fallback`).

This module holds the plan and the torch reference of the kernel (:func:`collect_below`): the semantics the Triton
kernel (:mod:`kernels.threshold_select_triton`) must reproduce, and the path on devices without it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "AUTO_MIN_QUERIES",
    "AUTO_MIN_KEYS_PER_CANDIDATE",
    "ThresholdPlan",
    "CandidateBuffers",
    "threshold_plan",
    "choose_selection",
    "candidate_buffers",
    "collect_below",
    "best_in_buffers",
    "needs_fallback",
    "triton_kernels",
]

OVERSAMPLE = 3  # expected keys under τ, in multiples of the candidates wanted
SAMPLE_RANK = 64  # τ = the sample's 64th best: keys under it vary by about 1/8 from query to query


# queries a CPU call needs for `auto` to pick the threshold selection (build_targets' chunks have 4,096): on 2 cores
# at k = 1,024 it was no faster than topk up to a few hundred queries and faster from about a thousand
# (benchmarks/results/selection-cpu-2026-12-04.txt)
AUTO_MIN_QUERIES = 1024
# keys per candidate wanted a store needs for it too: at 4,096 queries and k = 1,024 it ran at 0.74× topk's rate
# with 30 k keys, 0.94–1.02× with 100 k, 1.07× with 200 k, 1.37–1.66× with 400 k
# (benchmarks/results/selection-cpu-2026-12-05.txt)
AUTO_MIN_KEYS_PER_CANDIDATE = 192


def choose_selection(selection: str, device_type: str, num_queries: int, num_keys: int, candidates: int) -> str:
    """The selection ``auto`` stands for: ``threshold`` on the CPU for calls of at least :data:`AUTO_MIN_QUERIES`
    queries over at least :data:`AUTO_MIN_KEYS_PER_CANDIDATE` keys per candidate (measured faster there), else
    ``topk`` (on a GPU until the fused kernel is measured on one). ``topk`` and ``threshold`` are returned as given."""
    if selection != "auto":
        return selection
    large = num_queries >= AUTO_MIN_QUERIES and num_keys >= AUTO_MIN_KEYS_PER_CANDIDATE * candidates
    return "threshold" if device_type == "cpu" and large else "topk"


@dataclass(frozen=True)
class ThresholdPlan:
    """Every ``stride``-th key (from ``offset``) is sampled; τ is the sample's ``rank``-th best score; a query keeps
    at most ``capacity`` keys under τ."""

    stride: int
    rank: int
    capacity: int
    offset: int


def threshold_plan(num_keys: int, candidates: int, rank: int = SAMPLE_RANK) -> ThresholdPlan | None:
    """The sampling for ``candidates`` of ``num_keys`` keys, or None where a sample would be nearly the whole store
    (fewer than 4 keys a sample key, or a store under 8 × the expected keys under τ): plain selection is then as
    cheap. The buffer holds twice the expected count, 8 spreads above it at ``rank`` = 64."""
    expected = OVERSAMPLE * candidates
    stride = expected // rank
    if stride < 4 or num_keys < 8 * expected:
        return None
    capacity = -(-2 * expected // 128) * 128
    return ThresholdPlan(stride=stride, rank=rank, capacity=capacity, offset=stride // 2)


class CandidateBuffers(NamedTuple):
    """What :func:`collect_below` and the Triton kernel append to, block after block: scores [n, capacity] fp32
    (+inf where empty), ids [n, capacity] int64 (−1 where empty), counts [n] int32 (every key found under τ, also
    those past the capacity, so that an overflow is seen)."""

    scores: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor


def candidate_buffers(num_queries: int, capacity: int, device) -> CandidateBuffers:
    """Empty :class:`CandidateBuffers` of ``capacity`` slots a query on ``device``."""
    scores = torch.full((num_queries, capacity), math.inf, device=device)
    ids = torch.full((num_queries, capacity), -1, dtype=torch.int64, device=device)
    return CandidateBuffers(scores, ids, torch.zeros(num_queries, dtype=torch.int32, device=device))


def collect_below(score: torch.Tensor, tau: torch.Tensor, key_offset: int, buffers: CandidateBuffers) -> None:
    """Append each row's entries of ``score`` [n, B] that are ≤ τ [n] (their ids: column + ``key_offset``) to the
    buffers, in place; an entry that must not be kept (the query's own key) must already be +inf. Order within a
    row: by column here, by the kernel's scheduling in Triton; the buffers' sets are what matters."""
    scores, ids, counts = buffers
    capacity = scores.shape[1]
    rows, cols = (score <= tau[:, None]).nonzero(as_tuple=True)  # row-major: each row's hits in column order
    per_row = torch.bincount(rows, minlength=len(score)).to(torch.int32)  # from the few hits, not the [n, B] mask
    first = torch.cumsum(per_row, 0) - per_row  # index in (rows, cols) of each row's first hit
    slot = counts[rows].long() + torch.arange(len(rows), device=score.device) - first[rows]
    keep = slot < capacity
    rows, cols, slot = rows[keep], cols[keep], slot[keep]
    scores[rows, slot] = score[rows, cols].float()
    ids[rows, slot] = cols + key_offset
    counts += per_row


def best_in_buffers(buffers: CandidateBuffers, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids) [n, candidates] of each row's ``candidates`` best slots, equal scores by smaller id: the same
    whatever order the slots were filled in (the Triton kernel's depends on its scheduling), so a rerun or a resumed
    run keeps the same keys among exact ties. One ``topk`` over int64 keys packing the score's bits (made
    order-preserving as signed integers) above the id: all distinct, so the choice is unique."""
    scores, ids, _ = buffers
    bits = (scores + 0.0).view(torch.int32)  # + 0.0: −0.0 becomes +0.0, the same score
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)  # signed order = float order (no NaN here)
    packed = ordered * 2**32 + (ids & 0xFFFFFFFF)  # an empty slot (id −1, score +inf) sorts last
    pick = packed.topk(candidates, dim=1, largest=False, sorted=False).indices
    return scores.gather(1, pick), ids.gather(1, pick)


def needs_fallback(counts: torch.Tensor, candidates: int, capacity: int) -> torch.Tensor:
    """[n] bool: rows whose buffer cannot give their ``candidates`` best keys (fewer under τ, or some dropped)."""
    return (counts < candidates) | (counts > capacity)


def triton_kernels(device: torch.device):
    """:mod:`kernels.threshold_select_triton` where ``device`` is a GPU and Triton is installed, else None (then the
    torch path: the same results, the score block written)."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from lightning_memdec.kernels import threshold_select_triton

    return threshold_select_triton
