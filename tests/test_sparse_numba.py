"""The numba row kernel (`kernels.sparse_targets_numba`, the default path of `knn_distributions`) against the
sort-based numpy path byte for byte, and against a direct dense reference; its row total against
``np.add.reduceat``; the fallback to the sort-based path for token ids beyond the dense scratch."""

from __future__ import annotations

import numpy as np
import pytest
from test_sparse import assert_matches, dense_reference, hard_rows

import lightning_memdec.kernels.sparse_targets as sparse
from lightning_memdec.kernels.scoring import knn_scores
from lightning_memdec.kernels.sparse_targets import knn_distributions
from lightning_memdec.kernels.sparse_targets_numba import DENSE_MAX_TOKEN, DenseRows, segment_sum


def both_paths(monkeypatch, *args, **kw):
    """(default path, sort-based path) outputs of knn_distributions(*args, **kw)."""
    default = knn_distributions(*args, **kw)
    with monkeypatch.context() as m:
        m.setattr(sparse, "_DENSE_MAX_TOKEN", -1)
        return default, knn_distributions(*args, **kw)


def assert_same_bytes(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def random_rows(rng, n, width, vocab, datastore=3000):
    """Unsorted rows with duplicate tokens, distance ties, -1 padding (garbage distances), self-matches and
    weights that underflow to 0; `values` int32 up to `vocab` - 1."""
    values = rng.integers(0, vocab, size=datastore).astype(np.int32)
    values[:3] = vocab - 1  # the largest token id occurs
    ids = rng.integers(0, datastore, size=(n, width)).astype(np.int64)  # repeated ids too
    distances = rng.choice(np.linspace(0.0, 40.0, 9), size=(n, width)).astype(np.float32)  # many exact ties
    distances += rng.exponential(8.0, size=(n, width)).astype(np.float32) * (rng.random((n, width)) < 0.5)
    distances[rng.random((n, width)) < 0.05] = 5e3  # underflows at T <= 30
    query_ids = rng.integers(0, datastore, size=n).astype(np.int64)
    ids[::3, -1] = query_ids[::3]  # self-matches, nearest
    distances[::3, -1] = 0.0
    pad = rng.random((n, width)) < 0.1
    pad[:, 0] = False  # every row keeps a neighbour
    ids[pad] = -1
    distances[pad] = rng.choice(np.array([np.nan, -np.inf, np.inf, -3.0], np.float32), size=int(pad.sum()))
    return distances, ids, values, query_ids


SETTINGS = [
    {},
    {"query_ids": True},
    {"query_ids": True, "k": 3},  # 2k < width: rows cut to their k nearest
    {"query_ids": True, "k": 60},  # k close to the width: extra neighbours set to +inf
    {"k": 1},
    {"query_ids": True, "max_support": 5},
    {"query_ids": True, "min_prob": 0.03},
    {"k": 50, "max_support": 9, "min_prob": 0.01},
]


@pytest.mark.parametrize("vocab", [3, 40, 5000, 70_000])  # 70k: token ids beyond uint16 (int32 tokens)
@pytest.mark.parametrize("settings", SETTINGS)
def test_kernel_gives_the_sort_based_bytes(settings, vocab, monkeypatch):
    rng = np.random.default_rng(vocab)
    distances, ids, values, query_ids = random_rows(rng, n=70, width=64, vocab=vocab)
    kw = {**settings, "query_ids": query_ids if settings.get("query_ids") else None}
    for temperature in (0.7, 10.0, 1e6):  # 1e6: near-equal weights, many probability ties
        default, sort_based = both_paths(monkeypatch, distances, ids, values, temperature, **kw)
        assert_same_bytes(default, sort_based)
        if temperature == 10.0:  # (at 1e6, renormalising after truncation can round two probs to a tie)
            assert_matches(default, dense_reference(distances, ids, values, temperature, **kw))


@pytest.mark.parametrize("settings", [{}, {"query_ids": True, "k": 35}, {"k": 36, "max_support": 6}])
def test_kernel_on_hard_rows_and_long_rows(settings, monkeypatch):
    distances, ids, values, query_ids = hard_rows(np.random.default_rng(8))
    kw = {**settings, "query_ids": query_ids if settings.get("query_ids") else None}
    assert_same_bytes(*both_paths(monkeypatch, distances, ids, values, 3.0, **kw))
    # Rows wider than numpy's pairwise block (128) and its recursion's splits, small and large vocabularies.
    for width, vocab in ((300, 50), (1030, 400), (2500, 60_000)):
        distances, ids, values, query_ids = random_rows(np.random.default_rng(width), n=6, width=width, vocab=vocab)
        assert_same_bytes(*both_paths(monkeypatch, distances, ids, values, 5.0, query_ids=query_ids))


def exact_dense_rows(distances, ids, values, temperature, query_ids=None):
    """A direct dense reference, one row at a time: the kernel's float32 weights, summed per token into a float64
    dict in ascending column order (dropped neighbours add 0.0 to their clipped id's token), tokens in order, the
    row total by np.add.reduceat, probs rounded to float32, zeros dropped, sorted by (-prob, token)."""
    counts, toks, probs = [], [], []
    for i in range(len(distances)):
        valid = ids[i] >= 0 if query_ids is None else (ids[i] >= 0) & (ids[i] != query_ids[i])
        d = np.where(valid, distances[i], np.float32(np.inf))[None]
        w = np.exp(knn_scores(d, temperature, nearest=d.min(axis=1, keepdims=True)))[0]
        sums: dict[int, float] = {}
        for c in range(ids.shape[1]):
            t = int(values[max(int(ids[i, c]), 0)])
            sums[t] = sums.get(t, 0.0) + float(w[c])
        t = np.array(sorted(sums), dtype=np.int32)
        s = np.array([sums[x] for x in t.tolist()])
        p = (s / np.add.reduceat(s, [0])[0]).astype(np.float32)
        t, p = t[p > 0], p[p > 0]
        order = np.lexsort((t, -p))
        counts.append(t.size), toks.append(t[order]), probs.append(p[order])
    return np.array(counts, dtype=np.int64), np.concatenate(toks), np.concatenate(probs)


@pytest.mark.parametrize("vocab", [4, 70_000])
def test_kernel_equals_a_direct_dense_reference_bit_for_bit(vocab):
    for width in (17, 200):
        rng = np.random.default_rng(width + vocab)
        distances, ids, values, query_ids = random_rows(rng, n=25, width=width, vocab=vocab)
        for temperature, qids in ((2.0, None), (30.0, query_ids), (1e6, query_ids)):
            got = knn_distributions(distances, ids, values, temperature, query_ids=qids)
            assert_same_bytes(got, exact_dense_rows(distances, ids, values, temperature, query_ids=qids))


def test_kernel_adds_a_tokens_weights_in_column_order():
    """Float32 weights whose float64 sum depends on the order (most sums of float32 weights are exact in float64,
    so the random tests above cannot tell): the kernel adds them in ascending column order, as np.add.at does on
    the sort-based path."""
    tiny, half_ulp = 2.0**-53, 2.0**-24
    w = np.array([[1.0, half_ulp, tiny, tiny, 1 - half_ulp], [tiny, tiny, 1.0, half_ulp, 1 - half_ulp]], np.float32)
    tok = np.array([[7, 7, 7, 7, 3], [7, 7, 7, 7, 3]], np.int32)
    rows = DenseRows(7, w.size)
    rows(w, tok)
    [(counts, toks, probs)] = rows.parts()
    # Row 0: ((1 + 2^-24) + 2^-53) + 2^-53 rounds to 1 + 2^-24, half of it is a float32 tie: p = 0.5 (to even).
    # Row 1: (2^-53 + 2^-53) + 1 + 2^-24 is exact and above the tie: p = 0.5 + 2^-24. Both totals round to 2.
    assert counts.tolist() == [2, 2] and toks.tolist() == [7, 3, 7, 3]
    assert probs.tolist() == [0.5, 0.5 - 2.0**-25, 0.5 + 2.0**-24, 0.5 - 2.0**-25]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 128, 129, 130, 136, 137, 255, 256, 257, 1031, 4099])
def test_segment_sum_is_numpys_reduceat(n):
    rng = np.random.default_rng(n)
    stack, partial = np.empty((64, 3), np.int64), np.empty(64)
    plain_differs = False
    for _ in range(5):
        a = rng.random(n + 10) * np.exp(rng.normal(0.0, 12.0, n + 10))  # wide magnitudes: rounding shows
        want = np.add.reduceat(a, [5, 5 + n])[0]
        assert segment_sum(a, 5, 5 + n, stack, partial) == want
        plain_differs |= want != sum(a[5 : 5 + n].tolist())  # a left-to-right sum
    assert plain_differs or n < 128  # the order matters on these inputs: the test can tell


@pytest.mark.parametrize("tied", [0, 40, 300])
def test_rows_of_many_equal_probs_sort_as_the_sort_based_path(tied, monkeypatch):
    """Long rows whose ``tied`` tokens share one probability (one neighbour each, at one distance) among spread
    ones: one crowded bucket of the kernel's sort (over 64 keys: sorted by np.sort) or a few collisions mended by
    insertion; the tied tokens in ascending order, as the sort-based path has them."""
    rng = np.random.default_rng(tied)
    width, vocab = 1024, 5000
    values = rng.permutation(vocab).astype(np.int32)  # entry i holds a distinct token
    ids = np.stack([rng.permutation(vocab)[:width] for _ in range(4)]).astype(np.int64)  # distinct tokens per row
    distances = (rng.exponential(20.0, size=(4, width)) + 50.0).astype(np.float32)
    distances[:, :tied] = 80.0  # equal distances: equal weights, equal probs
    default, sort_based = both_paths(monkeypatch, distances, ids, values, 10.0)
    assert_same_bytes(default, sort_based)
    counts, _, probs = default
    assert np.unique(probs[: counts[0]], return_counts=True)[1].max() >= max(tied, 1)  # the ties are there


def test_chunks_blocks_and_threads_give_the_sort_based_bytes(monkeypatch):
    distances, ids, values, query_ids = random_rows(np.random.default_rng(11), n=90, width=40, vocab=30)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 3 * 40)
    monkeypatch.setattr(sparse, "_BLOCK_ELEMENTS", 7 * 40)
    monkeypatch.setattr(sparse, "worker_threads", lambda: 3)
    for kw in ({}, {"query_ids": query_ids, "k": 12, "max_support": 4}):
        assert_same_bytes(*both_paths(monkeypatch, distances, ids, values, 4.0, **kw))


@pytest.mark.parametrize("offset", [DENSE_MAX_TOKEN - 29, DENSE_MAX_TOKEN - 28, 2**31 - 30])
def test_large_token_ids_fall_back_to_the_sort_based_path(offset, monkeypatch):
    """Token ids up to DENSE_MAX_TOKEN take the kernel, larger ones the sort-based path; the same rows either way."""
    distances, ids, values, query_ids = random_rows(np.random.default_rng(12), n=30, width=24, vocab=30)
    values = (values.astype(np.int64) + offset).astype(np.int32)
    built = []
    monkeypatch.setattr(
        sparse, "DenseRows", lambda max_token, size: built.append(max_token) or DenseRows(max_token, size)
    )
    got = knn_distributions(distances, ids, values, 2.0, query_ids=query_ids, k=20)
    dense = values.max() <= DENSE_MAX_TOKEN
    assert built == ([int(values.max())] if dense else [])
    assert_matches(got, dense_reference(distances, ids, values, 2.0, query_ids=query_ids, k=20))
    small = (values - offset).astype(np.int32)  # the same rows with small token ids, through the kernel
    counts, toks, probs = knn_distributions(distances, ids, small, 2.0, query_ids=query_ids, k=20)
    assert_same_bytes(got, (counts, toks + np.int32(offset), probs))
    with pytest.raises(ValueError, match="dense scratch"):
        DenseRows(DENSE_MAX_TOKEN + 1, 10)


def test_lowest_set_bit_equals_the_bit_position():
    from lightning_memdec.kernels.sparse_targets_numba import lowest_set_bit

    rng = np.random.default_rng(0)
    for i in range(64):
        for high in (0, *rng.integers(0, 2**63, 3).tolist()):
            x = ((1 << i) | (high << (i + 1))) & (2**64 - 1)
            assert lowest_set_bit(np.uint64(x)) == i, (i, x)
