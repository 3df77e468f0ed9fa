"""Benchmark: kNN targets row by row (the paper's dense-scatter code) vs `knn_distributions`.

Run: ``python benchmarks/targets.py [--n_queries 20000 --k 1024 ...]``. Prints ``name: number`` lines,
the last being ``targets_speedup`` (row-by-row seconds / vectorised seconds, for all rows). Both sides
include the gather of the neighbours' token ids from the datastore.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from jsonargparse import CLI

from lightning_memdec.kernels import sparse_targets as sparse
from lightning_memdec.kernels.sparse_targets import csr_offsets, knn_distributions


def synthetic(n_queries: int, k: int, vocab: int, datastore: int, seed: int):
    """Neighbour lists shaped like faiss output: unsorted rows, Zipf-skewed datastore tokens."""
    rng = np.random.default_rng(seed)
    freq = 1.0 / (np.arange(vocab) + 2.7) ** 1.1  # Zipf-like unigram frequencies of next tokens
    values = rng.choice(vocab, size=datastore, p=freq / freq.sum()).astype(np.int32)
    ids = rng.integers(0, datastore, size=(n_queries, k), dtype=np.int64)
    # Squared L2 distances: a per-query offset plus a spread of a few temperatures, in random order.
    distances = rng.uniform(50, 500, size=(n_queries, 1)) + rng.exponential(20.0, size=(n_queries, k))
    return distances.astype(np.float32), ids, values


def rowwise(distances, ids, values, temperature, vocab):
    """The paper's approach: one dense vocabulary row per query, then nonzero() and sort by prob."""
    counts, toks, probs = [], [], []
    d_all, v_all = torch.from_numpy(distances), torch.from_numpy(values[ids].astype(np.int64))
    for i in range(d_all.shape[0]):
        w = torch.softmax(-d_all[i] / temperature, dim=0)
        dense = torch.zeros(vocab).scatter_add_(0, v_all[i], w)
        nz = dense.nonzero().squeeze(1)
        p, order = torch.sort(dense[nz], descending=True)
        counts.append(nz.numel())
        toks.append(nz[order])
        probs.append(p)
    return np.array(counts), torch.cat(toks).numpy(), torch.cat(probs).numpy()


def _by_token(counts, toks, probs):
    """Reorder each CSR row by token id, so that orders differing only at float ties compare equal."""
    rows = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((toks, rows))
    return toks[order], probs[order]


def main(
    n_queries: int = 20000,
    k: int = 1024,
    vocab: int = 50257,
    datastore: int = 2_000_000,
    temperature: float = 10.0,
    rowwise_rows: int = 2000,
    repeats: int = 3,
    seed: int = 0,
) -> None:
    """Time both approaches (best of `repeats`, interleaved), check they agree, print the figures.

    Args:
        n_queries: query rows (positions) to build targets for.
        k: neighbours per query.
        vocab: vocabulary size.
        datastore: datastore entries (length of the token-id array the neighbour ids index).
        temperature: kNN softmax temperature.
        rowwise_rows: rows the slow row-by-row reference is timed on (its time is scaled per row).
        repeats: timing rounds; the best round of each approach is reported (the machine may be shared).
        seed: random seed of the synthetic neighbour lists.
    """
    distances, ids, values = synthetic(n_queries, k, vocab, datastore, seed)
    m = min(rowwise_rows, n_queries)
    threads = torch.get_num_threads()
    rowwise_subset = sparse_seconds = rowwise_cpu = sparse_cpu = float("inf")
    for _ in range(repeats):
        # The baseline gets its best thread count: intra-op threads barely help 50k-element ops
        # and can hurt a lot when the cores are shared.
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            start, cpu = time.perf_counter(), time.process_time()
            ref = rowwise(distances[:m], ids[:m], values, temperature, vocab)
            rowwise_subset = min(rowwise_subset, time.perf_counter() - start)
            rowwise_cpu = min(rowwise_cpu, time.process_time() - cpu)
        torch.set_num_threads(threads)
        start, cpu = time.perf_counter(), time.process_time()
        counts, toks, probs = knn_distributions(distances, ids, values, temperature)
        sparse_seconds = min(sparse_seconds, time.perf_counter() - start)
        sparse_cpu = min(sparse_cpu, time.process_time() - cpu)
    rowwise_seconds = rowwise_subset * n_queries / m

    # Same distributions on the row-by-row subset: same supports, probs allclose.
    offsets = csr_offsets(counts)
    end = offsets[m]
    assert np.array_equal(counts[:m], ref[0]), "support sizes differ"
    ref_t, ref_p = _by_token(*ref)
    got_t, got_p = _by_token(counts[:m], toks[:end], probs[:end])
    assert np.array_equal(ref_t, got_t), "token ids differ"
    np.testing.assert_allclose(got_p, ref_p, rtol=1e-4, atol=1e-7)
    # And every row of the vectorised output is a sorted distribution.
    row = np.repeat(np.arange(n_queries), counts)
    same_row = row[1:] == row[:-1]
    assert np.all(probs[1:][same_row] <= probs[:-1][same_row]), "rows not sorted by prob"
    row_sums = np.add.reduceat(probs.astype(np.float64), offsets[:-1])
    assert np.allclose(row_sums, 1.0, atol=1e-5), "rows do not sum to 1"
    # Orders may differ only where probabilities (nearly) tie.
    order_diff = ref[1] != toks[:end]
    assert np.allclose(ref[2][order_diff], probs[:end][order_diff], rtol=1e-5), "orders differ"

    print(f"rows: {n_queries}")
    print(f"neighbours: {k}")
    print(f"datastore: {datastore}")
    print(f"torch_threads: {threads}")
    print(f"sparse_threads: {sparse.worker_threads()}")
    print(f"mean_support: {counts.mean():.1f}")
    print(f"# row-by-row reference timed on the first {m} rows, its time scaled per row to all {n_queries}")
    print(f"rowwise_timed_rows: {m}")
    print(f"rowwise_subset_seconds: {rowwise_subset:.3f}")
    print(f"rowwise_us_per_row: {rowwise_seconds / n_queries * 1e6:.2f}")
    print(f"sparse_us_per_row: {sparse_seconds / n_queries * 1e6:.2f}")
    # CPU time (all threads together): total work, less sensitive to other jobs on shared cores.
    print(f"rowwise_cpu_us_per_row: {rowwise_cpu / m * 1e6:.2f}")
    print(f"sparse_cpu_us_per_row: {sparse_cpu / n_queries * 1e6:.2f}")
    print(f"targets_cpu_speedup: {rowwise_cpu / m / (sparse_cpu / n_queries):.2f}")
    print(f"rowwise_seconds: {rowwise_seconds:.3f}")
    print(f"sparse_seconds: {sparse_seconds:.3f}")
    print(f"targets_speedup: {rowwise_seconds / sparse_seconds:.2f}")


if __name__ == "__main__":
    CLI(main)
