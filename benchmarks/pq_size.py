"""Benchmark: PQ code bytes for an IVF-PQ index over narrow keys — the plan's m beside fewer bytes and IVF-Flat.

Run: ``python benchmarks/pq_size.py --datastore DIR [--queries 1024 --k 1024]`` on a datastore from
``memdec build-datastore``. The automatic plan gives every store past its Flat sizes ``IVF<nlist>,PQ<m>`` with m the
largest legal code size ≤ 64 dividing d: at the paper's d = 1,600 that is 25 dimensions a byte, at d ≤ 64 one or
two. Every variant here shares one coarse quantizer (the plan's nlist, trained once on the plan's sample), so they
differ only in how a list's entries are coded. For each: training the codes and adding the keys (wall and CPU
seconds), the loaded index's memory (the RSS growth of a fresh process that reads it and runs one search; FAISS
builds IVF-PQ's precomputed table on loading), milliseconds a query at the default nprobe, recall@k of the exact
neighbours (own entry excluded, as for training targets), and the mean total variation between the p_kNN rows
``build-targets`` would store (T = 16) and those of exact search: with the index's distances, and re-ranked by exact
distances (``--knn.exact_distances``). Prints ``name: number`` lines, then the planned index's total variation over
the lowest of any variant's (re-ranked; above 1, its codes cost accuracy), the largest PQ's memory over IVF-Flat's as
the plan estimates it, and last, ``largest_pq_over_flat_memory``, as measured: the plan compresses only where the
estimate is at most 0.5.
"""

from __future__ import annotations

import functools
import multiprocessing
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import report, timed  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI
from scale import proc_status

from lightning_memdec.io.readers import Datastore
from lightning_memdec.kernels.sparse_targets import knn_distributions
from lightning_memdec.retrieval.exact_search import exact_distances, exact_search
from lightning_memdec.retrieval.faiss_index import set_nprobe
from lightning_memdec.retrieval.index_plan import IndexRule, plan_index, pq_size
from lightning_memdec.retrieval.settings import IndexSettings, KNNSearch


def loaded_rss_growth(path: str, query: np.ndarray, nprobe: int, answer) -> None:
    """In a fresh process: the resident memory (bytes) that reading the index at ``path`` and searching one query
    adds, the index kept alive while measured."""
    before = proc_status()["VmRSS"]
    index = faiss.read_index(path)
    set_nprobe(index, nprobe)
    index.search(query, 1)
    answer.put(proc_status()["VmRSS"] - before)


def loaded_memory_mib(index, query: np.ndarray, nprobe: int) -> float:
    """The memory the index takes once loaded, measured in a process of its own (``loaded_rss_growth``)."""
    spawn = multiprocessing.get_context("spawn")
    answer = spawn.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "index.faiss")
        faiss.write_index(index, path)
        child = spawn.Process(target=loaded_rss_growth, args=(path, query, nprobe, answer))
        child.start()
        grown = answer.get()
        child.join()
    return grown / 2**20


def p_knn_rows(dist: np.ndarray, ids: np.ndarray, values, own: np.ndarray | None, k: int, temperature: float):
    """Dense [n, V] p_kNN of the rows build-targets would store (the package's one kernel)."""
    counts, tokens, probs = knn_distributions(dist, ids, values, temperature, query_ids=own, k=k)
    rows = np.zeros((len(counts), int(values.max()) + 1), dtype=np.float64)
    np.add.at(rows, (np.repeat(np.arange(len(counts)), counts), tokens), probs)
    return rows


def trained_and_filled(index, train: np.ndarray, keys: np.ndarray) -> None:
    """Train the index (its coarse quantizer is trained already: the codes alone) and add every key."""
    index.train(train)
    index.add(keys)


def index_quality(index, q, own, keys, values, exact_ids, exact_rows, k, temperature) -> dict[str, float]:
    """Milliseconds a query, recall@k of the exact neighbours, and p_kNN's total variation from exact search's
    (the index's distances; exact distances of the same neighbours)."""
    (dist, ids), seconds = timed(functools.partial(index.search, q, k + 1))
    recall = np.mean([len(np.intersect1d(np.setdiff1d(i, [o]), e)) / k for i, o, e in zip(ids, own, exact_ids)])
    reranked = exact_distances(torch.from_numpy(q), keys, torch.from_numpy(ids)).numpy()
    tv = {}
    for name, d in (("index", dist), ("reranked", reranked)):
        rows = p_knn_rows(d, ids, values, own, k, temperature)
        tv[name] = 0.5 * np.abs(rows - exact_rows).sum(axis=1).mean()
    return {"ms_per_query": 1000 * seconds / len(q), "recall": recall, "tv": tv["index"], "tv_reranked": tv["reranked"]}


def main(datastore: str, queries: int = 1024, k: int = 1024, sizes: tuple[int, ...] = (), seed: int = 0) -> None:
    """Every variant over the store at ``datastore``: the largest PQ size (``pq_size``: the plan's where it
    compresses), the smaller powers of two down to d/16 (or ``sizes``), and IVF-Flat."""
    store = Datastore(datastore)
    keys, values = store.keys, store.values
    n, dim = keys.shape
    plan = plan_index(n, dim, rule=IndexRule(flat_below=0))
    nprobe, temperature = IndexSettings().nprobe, KNNSearch().temperature
    largest = pq_size(dim)
    sizes = sizes or tuple(m for m in (64, 32, 16, 8, 4) if m <= largest and dim % m == 0 and m >= dim // 16)
    report("keys", n)
    report("dim", dim)
    report("plan", f"{plan.factory} nprobe {nprobe}")
    rng = np.random.default_rng(seed)
    own = np.sort(rng.choice(n, queries, replace=False))
    q = np.asarray(keys[own], dtype=np.float32)
    exact_dist, exact_ids = exact_search(q, keys, k, query_ids=own)
    exact_rows = p_knn_rows(exact_dist.numpy(), exact_ids.numpy(), values, None, k, temperature)
    sample = np.sort(rng.choice(n, plan.train_size, replace=False))
    train = np.asarray(keys[sample], dtype=np.float32)
    quantizer = faiss.IndexFlatL2(dim)
    _, coarse_s = timed(lambda: faiss.Clustering(dim, plan.nlist).train(train, quantizer))
    report("coarse_train_seconds", coarse_s)
    all_keys = np.asarray(keys, dtype=np.float32)
    measured, memory = {}, {}
    for m in (*sorted({largest, *sizes}, reverse=True), None):
        name = f"pq{m}" if m else "flat"
        if m:
            index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, m, 8)
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist)
        cpu_start = time.process_time()
        _, build_s = timed(functools.partial(trained_and_filled, index, train, all_keys))
        build_cpu_s = time.process_time() - cpu_start
        set_nprobe(index, nprobe)
        quality = index_quality(index, q, own, keys, values, exact_ids.numpy(), exact_rows, k, temperature)
        memory[name] = loaded_memory_mib(index, q[:1], nprobe)
        report(f"{name}_code_bytes", m or dim * 4)
        report(f"{name}_build_seconds", build_s)
        report(f"{name}_build_cpu_seconds", build_cpu_s)  # all threads: a shared machine's load does not add to it
        report(f"{name}_loaded_mib", memory[name])
        for key, value in quality.items():
            report(f"{name}_{key}", float(value))
        measured[name] = quality
    planned = f"pq{plan.pq_m}" if plan.pq_m else "flat"
    best = min(v["tv_reranked"] for v in measured.values())
    report("plan_over_best_tv", measured[planned]["tv_reranked"] / best)
    pq_estimate = plan_index(n, dim, factory=f"IVF{plan.nlist},PQ{largest}").index_bytes
    report(
        "largest_pq_planned_over_flat_memory",
        pq_estimate / plan_index(n, dim, factory=f"IVF{plan.nlist},Flat").index_bytes,
    )
    report("largest_pq_over_flat_memory", memory[f"pq{largest}"] / memory["flat"])


if __name__ == "__main__":
    CLI(main, as_positional=False)
