"""Benchmark: exact CPU search vs the FAISS index it would replace, at the edge of `auto`'s CPU rule.

Run: ``python benchmarks/search_backends.py [--dims [64, 1024] --queries 512 --k 1024]``. For each key width d the
store has the most keys `choose_search` still searches exactly on the CPU (N·(d + EXACT_CPU_SELECTION_WIDTH) =
EXACT_CPU_MAX_ELEMENTS), drawn around 256 centres (a store's keys cluster), fp16 as a datastore holds them. Both sides
end with the same exact re-ranking (:func:`~lightning_memdec.retrieval.exact_search.exact_distances`) of k + margin
candidates, as ``build-targets`` runs them; the indexes are the Flat one ``build-index``'s auto plan gives a store of
this size and the IVF one it plans past its Flat sizes (IVF-PQ, or IVF-Flat for narrow keys), probed with the
default nprobe. Prints, per d, milliseconds a query of each and their ratio; the last line,
``exact_over_faiss_at_the_edge``, is the largest ratio: what `auto` pays at most for exact neighbours.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np
import torch
from common import report, timed  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI

from lightning_memdec.retrieval.exact_search import (
    EXACT_CPU_MAX_ELEMENTS,
    EXACT_CPU_SELECTION_WIDTH,
    choose_search,
    exact_distances,
    exact_search,
)
from lightning_memdec.retrieval.faiss_index import set_nprobe
from lightning_memdec.retrieval.index_plan import IndexRule, plan_index
from lightning_memdec.retrieval.search_budget import rerank_margin
from lightning_memdec.retrieval.settings import IndexSettings


def clustered_keys(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32)
    return (centres[rng.integers(0, 256, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float16)


def faiss_search(index, queries: np.ndarray, keys: np.ndarray, candidates: int) -> torch.Tensor:
    """The index's candidates, re-ranked exactly: what build-targets' faiss backend does per chunk."""
    _, ids = index.search(queries, candidates)
    return exact_distances(torch.from_numpy(queries), keys, torch.from_numpy(ids))


def built_index(keys: np.ndarray, factory: str, train_size: int, nprobe: int):
    index = faiss.index_factory(keys.shape[1], factory)
    if not index.is_trained:
        sample = np.random.default_rng(1).choice(len(keys), min(len(keys), train_size), replace=False)
        index.train(keys[sample].astype(np.float32))
    index.add(keys.astype(np.float32))
    set_nprobe(index, nprobe if "IVF" in factory else None)
    return index


def edge_ratio(dim: int, queries: int, k: int) -> float:
    """Exact search's milliseconds a query over the fastest FAISS index's, at the largest store auto searches
    exactly for this d; each printed."""
    n = EXACT_CPU_MAX_ELEMENTS // (dim + EXACT_CPU_SELECTION_WIDTH)
    assert choose_search(n, dim, "cpu") == "exact" and choose_search(n + 1, dim, "cpu") == "faiss"
    keys = clustered_keys(n, dim)
    q = keys[:queries].astype(np.float32)
    candidates = k + rerank_margin(k, torch.float32)
    nprobe = IndexSettings().nprobe
    ivf = plan_index(n, dim, rule=IndexRule(flat_below=0))  # what build-index plans past its Flat sizes
    report(f"keys_d{dim}", n)
    report(f"ivf_index_d{dim}", f"{ivf.factory} nprobe {nprobe}")
    _, exact_s = timed(functools.partial(exact_search, q, keys, k, query_ids=np.arange(queries)))
    report(f"exact_ms_per_query_d{dim}", 1000 * exact_s / queries)
    seconds = []
    for name, factory, train_size in (("flat", "Flat", 0), ("ivf", ivf.factory, ivf.train_size)):
        index = built_index(keys, factory, train_size, nprobe)
        _, took = timed(functools.partial(faiss_search, index, q, keys, candidates))
        report(f"faiss_{name}_ms_per_query_d{dim}", 1000 * took / queries)
        seconds.append(took)
    report(f"exact_over_fastest_faiss_d{dim}", exact_s / min(seconds))
    return exact_s / min(seconds)


def main(dims: tuple[int, ...] = (64, 1024), queries: int = 512, k: int = 1024) -> None:
    report("exact_over_faiss_at_the_edge", max(edge_ratio(dim, queries, k) for dim in dims))


if __name__ == "__main__":
    CLI(main, as_positional=False)
