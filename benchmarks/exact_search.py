"""Benchmark: exact kNN search as it was (products, three elementwise passes, full-width top-k) vs `exact_search`.

Run: ``python benchmarks/exact_search.py [--keys 200000 --dim 256 --queries 1024 --k 256]``. Both sides stream
the same fp16 keys in the same blocks and end with the same exact fp32 re-ranking
(:func:`~lightning_memdec.retrieval.exact_search.exact_distances`), so the difference is the per-block work the
new search removed: the [queries × block] fp32 passes for −2·, +‖q‖², +‖k‖², and the top-k over a full-width row
(now two-stage). Prints ``name: number`` lines, the last being ``exact_search_speedup`` (old seconds / new
seconds, best of ``repeats``); the neighbour sets are checked equal first.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from jsonargparse import CLI

from lightning_memdec.retrieval.exact_search import exact_distances, exact_search, rerank_margin


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


def best_time(fn, repeats: int):
    result, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main(
    keys: int = 200_000, dim: int = 256, queries: int = 1024, k: int = 256, block: int = 65_536, repeats: int = 3
) -> None:
    """Time both searches on random fp16 keys (queries: perturbed keys, so neighbours are near) and compare."""
    rng = np.random.default_rng(0)
    store = rng.standard_normal((keys, dim)).astype(np.float16)
    q = (store[:queries].astype(np.float32) + 0.3 * rng.standard_normal((queries, dim))).astype(np.float32)
    (old_d, old_i), old_s = best_time(lambda: previous_search(q, store, k, block), repeats)
    (new_d, new_i), new_s = best_time(lambda: exact_search(q, store, k, block_size=block), repeats)
    if not (torch.equal(old_i, new_i) and torch.equal(old_d, new_d)):
        raise SystemExit("the two searches disagree: the benchmark would compare different work")
    flops = 2 * keys * dim * queries
    print(f"keys: {keys}\ndim: {dim}\nqueries: {queries}\nk: {k}\nblock: {block}\nthreads: {torch.get_num_threads()}")
    print(f"old_seconds: {old_s:.4f}\nnew_seconds: {new_s:.4f}")
    print(f"old_queries_per_s: {queries / old_s:.1f}\nnew_queries_per_s: {queries / new_s:.1f}")
    print(f"new_gflops_per_s: {flops / new_s / 1e9:.1f}")
    print(f"exact_search_speedup: {old_s / new_s:.3f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
