"""Designs for the exact search's per-block selection (the ``m`` smallest scores per row), measured beside the
library's one unsorted ``topk`` by benchmarks/gpu.py's search_breakdown and tested against ``topk`` in
tests/test_benchmarks.py. Neither is used by the library: on an H200 (2 M keys, 4,096 queries, m = 1,096) the two-stage
selection took 163 ms against topk's 99 ms, the threshold one 94 ms (126 ms at 1/8 of the block size)."""

from __future__ import annotations

import math

import torch

SELECT_WIDTH_FACTOR = 8  # a two-stage group's columns, as a multiple of the candidates kept
SELECT_MIN_WIDTH = 2048


def two_stage_select(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the ``m`` smallest per row, unsorted: the ``m`` smallest of each group of ``width``
    columns, then the ``m`` smallest of those (a batched selection over many narrow rows plus one over
    1/:data:`SELECT_WIDTH_FACTOR` of the width, instead of one over the full width)."""
    n, width_all = scores.shape
    m = min(m, width_all)
    width = max(SELECT_MIN_WIDTH, SELECT_WIDTH_FACTOR * m)
    groups = width_all // width
    if groups < 2:
        return scores.topk(m, dim=1, largest=False, sorted=False)
    head_v, head_i = scores[:, : groups * width].view(n, groups, width).topk(m, dim=2, largest=False, sorted=False)
    head_i = head_i + torch.arange(0, groups * width, width, device=scores.device)[:, None]
    vals, cols = [head_v.reshape(n, -1)], [head_i.reshape(n, -1)]
    if groups * width < width_all:
        tail_v, tail_i = scores[:, groups * width :].topk(min(m, width_all - groups * width), dim=1, largest=False)
        vals.append(tail_v)
        cols.append(tail_i + groups * width)
    best_v, pick = torch.cat(vals, 1).topk(m, dim=1, largest=False, sorted=False)
    return best_v, torch.cat(cols, 1).gather(1, pick)


def threshold_select(score: torch.Tensor, m: int, stride: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` smallest per row (values, columns) without a selection over the full width: a threshold from every
    ``stride``-th column (the 2·m/stride-th smallest of those, near the 2m-th of the row), the columns at or under it
    gathered with one ``nonzero`` into [n, most kept] (+inf padded), then a ``topk`` over those. A row that kept
    fewer than ``m`` falls back to a full ``topk`` (exact either way)."""
    n, width = score.shape
    m = min(m, width)
    sample = score[:, ::stride]
    t = sample.topk(min(sample.shape[1], max(1, 2 * m // stride)), dim=1, largest=False).values[:, -1:]
    mask = score <= t
    counts = mask.sum(1)
    rows, cols = mask.nonzero(as_tuple=True)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(len(rows), device=score.device) - starts[rows]
    cap = max(int(counts.max()), m)
    vals = torch.full((n, cap), math.inf, device=score.device, dtype=score.dtype)
    idx = torch.zeros((n, cap), device=score.device, dtype=torch.int64)
    vals[rows, slot], idx[rows, slot] = score[rows, cols], cols
    best_v, pick = vals.topk(m, dim=1, largest=False, sorted=False)
    best_i = idx.gather(1, pick)
    short = (counts < m).nonzero().squeeze(1)
    if len(short):
        best_v[short], best_i[short] = score[short].topk(m, dim=1, largest=False, sorted=False)
    return best_v, best_i
