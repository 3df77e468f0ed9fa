"""Benchmark: exact search's two candidate selections side by side, ``topk`` vs ``threshold``, on this machine.

Run: ``python benchmarks/selection.py [--keys 400000 --dim 256 --queries 2048 --k 1024]``. Both calls are
:func:`~lightning_memdec.retrieval.exact_search.exact_search` on the same fp16 keys (streamed from the host in the
same blocks, the same exact fp32 re-ranking); only ``selection`` differs: one ``topk`` over each block's full score
rows, or the keys under a per-query threshold sampled from the store (kernels.threshold_select; on the CPU its
torch path). The neighbours are checked equal first. Prints ``name: number`` lines, the last being
``threshold_speedup`` (topk seconds / threshold seconds, the median of ``repeats`` interleaved runs).
"""

from __future__ import annotations

import numpy as np
import torch
from common import report  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI

from lightning_memdec.evaluation.latency import median_times
from lightning_memdec.kernels.threshold_select import threshold_plan
from lightning_memdec.retrieval.exact_search import exact_search
from lightning_memdec.retrieval.search_budget import rerank_margin


def main(
    keys: int = 400_000, dim: int = 256, queries: int = 2048, k: int = 1024, block: int = 65_536, repeats: int = 3
) -> None:
    """Time both selections on random fp16 keys (queries: perturbed keys, so neighbours are near) and compare."""
    rng = np.random.default_rng(0)
    store = rng.standard_normal((keys, dim)).astype(np.float16)
    q = (store[:queries].astype(np.float32) + 0.3 * rng.standard_normal((queries, dim))).astype(np.float32)
    plan = threshold_plan(keys, k + rerank_margin(k, torch.float32))
    if plan is None:
        raise SystemExit(f"{keys} keys at k={k} are too few for a threshold plan: both calls would run topk")
    runners = {
        selection: (lambda selection=selection: exact_search(q, store, k, block_size=block, selection=selection))
        for selection in ("topk", "threshold")
    }
    found = {name: run() for name, run in runners.items()}  # also the warm-up of each
    if not (
        torch.equal(found["topk"][1], found["threshold"][1]) and torch.equal(found["topk"][0], found["threshold"][0])
    ):
        raise SystemExit("the two selections disagree: the benchmark would compare different results")
    seconds = median_times(runners, repeats=repeats, warmup=0)
    for name, value in (("keys", keys), ("dim", dim), ("queries", queries), ("k", k), ("block", block)):
        report(name, value)
    report("threshold_stride", plan.stride)
    report("threshold_capacity", plan.capacity)
    report("threads", torch.get_num_threads())
    for name in runners:
        report(f"{name}_seconds", seconds[name])
        report(f"{name}_queries_per_s", queries / seconds[name])
    report("threshold_speedup", seconds["topk"] / seconds["threshold"])


if __name__ == "__main__":
    CLI(main, as_positional=False)
