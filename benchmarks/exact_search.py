"""Benchmark: exact kNN search as it was (products, three elementwise passes, full-width top-k) vs `exact_search`.

Run: ``python benchmarks/exact_search.py [--keys 200000 --dim 256 --queries 1024 --k 256]``. Both sides stream
the same fp16 keys in the same blocks and end with the same exact fp32 re-ranking
(:func:`~lightning_memdec.retrieval.exact_search.exact_distances`), so the difference is the per-block work the
new search removed: the [queries × block] fp32 passes for −2·, +‖q‖², +‖k‖², and the top-k over a full-width row
(now two-stage). Prints ``name: number`` lines, the last being ``exact_search_speedup`` (old seconds / new
seconds, the median of ``repeats`` interleaved runs); the neighbour sets are checked equal first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from common import report  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI

from lightning_memdec.evaluation.latency import median_times
from lightning_memdec.retrieval.exact_search import exact_distances, exact_search
from lightning_memdec.retrieval.search_budget import rerank_margin


def previous_search(queries: np.ndarray, keys: np.ndarray, k: int, block: int):
    """The search before issue 20, per block: dist = mm(q, kᵀ)·(−2) + ‖q‖² + ‖k‖² (fp32), top-k of the full row."""
    q32 = torch.from_numpy(queries)
    candidates = min(len(keys), k + rerank_margin(k, torch.float32))
    q_norm = q32.square().sum(1, keepdim=True)
    best_d = torch.full((len(q32), candidates), math.inf)
    best_i = torch.full((len(q32), candidates), -1, dtype=torch.int64)
    for b0 in range(0, len(keys), block):
        kc = torch.from_numpy(keys[b0 : b0 + block]).float()
        dist = torch.mm(q32, kc.T).mul_(-2).add_(q_norm).add_((kc * kc).sum(1))
        top_d, top_i = dist.topk(min(candidates, len(kc)), dim=1, largest=False, sorted=False)
        merged_d, merged_i = torch.cat([best_d, top_d], 1), torch.cat([best_i, top_i + b0], 1)
        best_d, pick = merged_d.topk(candidates, dim=1, largest=False, sorted=False)
        best_i = merged_i.gather(1, pick)
    exact = exact_distances(q32, keys, best_i)
    by_id = best_i.argsort(dim=1, stable=True)
    best_i, exact = best_i.gather(1, by_id), exact.gather(1, by_id)
    order = exact.argsort(dim=1, stable=True)[:, :k]
    return exact.gather(1, order), best_i.gather(1, order)


def main(
    keys: int = 200_000, dim: int = 256, queries: int = 1024, k: int = 256, block: int = 65_536, repeats: int = 3
) -> None:
    """Time both searches on random fp16 keys (queries: perturbed keys, so neighbours are near) and compare."""
    rng = np.random.default_rng(0)
    store = rng.standard_normal((keys, dim)).astype(np.float16)
    q = (store[:queries].astype(np.float32) + 0.3 * rng.standard_normal((queries, dim))).astype(np.float32)
    old_d, old_i = previous_search(q, store, k, block)  # also the warm-up of each
    new_d, new_i = exact_search(q, store, k, block_size=block)
    if not (torch.equal(old_i, new_i) and torch.equal(old_d, new_d)):
        raise SystemExit("the two searches disagree: the benchmark would compare different work")
    runners = {
        "old": lambda: previous_search(q, store, k, block),
        "new": lambda: exact_search(q, store, k, block_size=block),
    }
    seconds = median_times(runners, repeats=repeats, warmup=0)
    old_s, new_s = seconds["old"], seconds["new"]
    for name, value in (("keys", keys), ("dim", dim), ("queries", queries), ("k", k), ("block", block)):
        report(name, value)
    report("threads", torch.get_num_threads())
    report("old_seconds", old_s)
    report("new_seconds", new_s)
    report("old_queries_per_s", queries / old_s)
    report("new_queries_per_s", queries / new_s)
    report("new_gflops_per_s", 2 * keys * dim * queries / new_s / 1e9)
    report("exact_search_speedup", old_s / new_s)


if __name__ == "__main__":
    CLI(main, as_positional=False)
