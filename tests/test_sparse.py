"""`knn_distributions` against a plainly written per-row reference (float64, dicts, no tricks)."""

from __future__ import annotations

import numpy as np
import pytest

import lightning_memdec.kernels.sparse_targets as sparse
from lightning_memdec.kernels.sparse_targets import csr_offsets, knn_distributions


def reference(distances, ids, values, temperature, query_ids=None, k=None, max_support=None, min_prob=None):
    """One row at a time, straight from the formula: a list of [(token, prob)] sorted like the kernel."""
    rows = []
    for i in range(len(distances)):
        cols = [c for c in range(ids.shape[1]) if ids[i, c] >= 0]
        if query_ids is not None:
            cols = [c for c in cols if ids[i, c] != query_ids[i]]
        cols.sort(key=lambda c: (float(distances[i, c]), c))  # nearest first, ties by column
        if k is not None:
            cols = cols[:k]
        d = np.array([float(distances[i, c]) for c in cols])
        w = np.exp(-(d - d.min()) / temperature)
        w /= w.sum()
        p: dict[int, float] = {}
        for weight, c in zip(w, cols):
            token = int(values[ids[i, c]])
            p[token] = p.get(token, 0.0) + weight
        items = sorted(((t, q) for t, q in p.items() if q > 0), key=lambda tq: (-tq[1], tq[0]))
        if max_support is not None:
            items = items[:max_support]
            total = sum(q for _, q in items)
            items = [(t, q / total) for t, q in items]
        if min_prob is not None:
            items = [items[0]] + [(t, q) for t, q in items[1:] if q >= min_prob]
            total = sum(q for _, q in items)
            items = [(t, q / total) for t, q in items]
        rows.append(items)
    return rows


def split_rows(counts, toks, probs):
    offsets = csr_offsets(counts)
    return [list(zip(toks[a:b].tolist(), probs[a:b].tolist())) for a, b in zip(offsets[:-1], offsets[1:])]


def assert_matches(got, want):
    counts, toks, probs = got
    assert counts.dtype == np.int64 and toks.dtype == np.int32 and probs.dtype == np.float32
    assert counts.sum() == toks.size == probs.size
    rows = split_rows(counts, toks, probs)
    assert len(rows) == len(want)
    for i, (row, ref) in enumerate(zip(rows, want)):
        assert sorted(t for t, _ in row) == sorted(t for t, _ in ref), f"row {i}: different support"
        ref_p = dict(ref)
        np.testing.assert_allclose([q for _, q in row], [ref_p[t] for t, _ in row], rtol=2e-5, atol=1e-7)
        # Sorted by prob descending, ties by smaller token id, and summing to 1.
        for (t1, q1), (t2, q2) in zip(row, row[1:]):
            assert q1 > q2 or (q1 == q2 and t1 < t2), f"row {i}: not sorted"
        assert abs(sum(q for _, q in row) - 1.0) < 1e-5


def make_data(rng, n=40, k=24, datastore=500, vocab=30, pad_rows=8, self_rows=True):
    """Unsorted distance rows, duplicate tokens, -1 padding and self-matches in random columns."""
    values = rng.integers(0, vocab, size=datastore).astype(np.int32)
    ids = np.stack([rng.choice(datastore, size=k, replace=False) for _ in range(n)]).astype(np.int64)
    distances = rng.uniform(0.0, 30.0, size=(n, k)).astype(np.float32)
    query_ids = rng.integers(0, datastore, size=n).astype(np.int64)
    query_ids[query_ids == datastore - 1] = 0
    ids[ids == query_ids[:, None]] = datastore - 1  # no accidental self-matches...
    if self_rows:  # ...then every other row holds its own query, nearest, never in column 0
        for i in range(0, n, 2):
            c = int(rng.integers(1, k))
            ids[i, c] = query_ids[i]
            distances[i, c] = 0.0
    for i in rng.choice(n, size=pad_rows, replace=False):
        cols = rng.choice(k, size=int(rng.integers(1, k // 2)), replace=False)
        ids[i, cols] = -1
        distances[i, cols] = rng.choice([np.inf, np.nan, 3.4e38, -5.0])  # garbage must be ignored
    return distances, ids, values, query_ids


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0, 100.0])
def test_matches_reference(temperature):
    rng = np.random.default_rng(0)
    distances, ids, values, query_ids = make_data(rng)
    got = knn_distributions(distances, ids, values, temperature, query_ids=query_ids)
    assert_matches(got, reference(distances, ids, values, temperature, query_ids=query_ids))
    # Rows really contain duplicates, padding and self-matches (so the test covers them).
    assert (got[0] < (ids >= 0).sum(1)).all()


def test_self_exclusion_is_by_id_not_column():
    rng = np.random.default_rng(1)
    distances, ids, values, query_ids = make_data(rng, pad_rows=0)
    with_self = knn_distributions(distances, ids, values, 2.0)
    without = knn_distributions(distances, ids, values, 2.0, query_ids=query_ids)
    assert_matches(with_self, reference(distances, ids, values, 2.0))
    assert_matches(without, reference(distances, ids, values, 2.0, query_ids=query_ids))
    # Same as physically deleting the self column; rows without their query are untouched.
    rows = split_rows(*without)
    for i in range(len(ids)):
        keep = ids[i] != query_ids[i]
        alone = knn_distributions(distances[i : i + 1, keep], ids[i : i + 1, keep], values, 2.0)
        assert split_rows(*alone)[0] == rows[i]
    assert split_rows(*with_self)[1] == rows[1]  # odd rows hold no self-match


def test_nearest_k_after_self_exclusion():
    rng = np.random.default_rng(2)
    distances, ids, values, query_ids = make_data(rng)
    for k in (1, 5, 23, 24, 100):
        got = knn_distributions(distances, ids, values, 3.0, query_ids=query_ids, k=k)
        assert_matches(got, reference(distances, ids, values, 3.0, query_ids=query_ids, k=k))
    # k=1: the single nearest remaining neighbour's token, with prob 1.
    counts, toks, probs = knn_distributions(distances, ids, values, 3.0, query_ids=query_ids, k=1)
    assert (counts == 1).all() and np.all(probs == 1.0)
    masked = np.where((ids >= 0) & (ids != query_ids[:, None]), distances, np.inf)
    nearest = ids[np.arange(len(ids)), np.argmin(masked, axis=1)]
    np.testing.assert_array_equal(toks, values[nearest])


def test_temperature_follows_the_formula():
    # Token 7 from two neighbours at distance 1, token 3 from one at distance 2.
    distances = np.array([[2.0, 1.0, 1.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2]])
    values = np.array([3, 7, 7], dtype=np.int32)
    for temperature in (0.5, 1.0, 4.0):
        counts, toks, probs = knn_distributions(distances, ids, values, temperature)
        w3, w7 = np.exp(-2.0 / temperature), 2 * np.exp(-1.0 / temperature)
        assert counts.tolist() == [2] and toks.tolist() == [7, 3]
        np.testing.assert_allclose(probs, [w7 / (w3 + w7), w3 / (w3 + w7)], rtol=1e-6)
    # Higher temperature flattens, lower sharpens.
    p_cold = knn_distributions(distances, ids, values, 0.1)[2][0]
    p_hot = knn_distributions(distances, ids, values, 100.0)[2][0]
    assert p_cold > 0.999 and abs(p_hot - 2 / 3) < 1e-2


def test_ties_put_smaller_token_first_and_underflow_is_dropped():
    distances = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1e4, np.inf]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3, 4, 5, 6]])
    values = np.array([9, 5, 3, 5, 12, 1, 2], dtype=np.int32)
    counts, toks, probs = knn_distributions(distances, ids, values, 1.0)
    # Token 1 is 1e4 away: its weight underflows to exactly 0, so it is not in the support;
    # likewise token 2 at +inf.
    assert counts.tolist() == [4] and toks.tolist() == [5, 3, 9, 12]
    np.testing.assert_allclose(probs, [0.4, 0.2, 0.2, 0.2], rtol=1e-6)


@pytest.mark.parametrize(
    "max_support,min_prob", [(1, None), (3, None), (None, 0.08), (None, 1.0), (4, 0.2), (None, 0.0)]
)
def test_truncation_renormalises(max_support, min_prob):
    rng = np.random.default_rng(3)
    distances, ids, values, query_ids = make_data(rng, vocab=12)
    got = knn_distributions(
        distances, ids, values, 5.0, query_ids=query_ids, max_support=max_support, min_prob=min_prob
    )
    want = reference(distances, ids, values, 5.0, query_ids=query_ids, max_support=max_support, min_prob=min_prob)
    assert_matches(got, want)
    counts = got[0]
    full = knn_distributions(distances, ids, values, 5.0, query_ids=query_ids)[0]
    assert (counts >= 1).all() and (counts <= full).all()
    if max_support is not None:
        assert (counts <= max_support).all() and (counts < full).any()
    if min_prob == 1.0:
        assert (counts == 1).all() and np.all(got[2] == 1.0)


def test_chunks_blocks_and_threads_agree(monkeypatch):
    rng = np.random.default_rng(4)
    distances, ids, values, query_ids = make_data(rng, n=50)
    whole = knn_distributions(distances, ids, values, 2.0, query_ids=query_ids, k=20)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 3 * 24)
    monkeypatch.setattr(sparse, "_BLOCK_ELEMENTS", 7 * 24)
    monkeypatch.setattr(sparse, "worker_threads", lambda: 3)
    pieces = knn_distributions(distances, ids, values, 2.0, query_ids=query_ids, k=20)
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a, b)
    # Errors name the global row, not the row within a chunk.
    ids[37] = -1
    with pytest.raises(ValueError, match="row 37 "):
        knn_distributions(distances, ids, values, 2.0)


def test_large_token_ids_and_memmap_values(tmp_path):
    # Token ids near 2**31 leave few bits for the row in the second sort key: rows go in blocks.
    rng = np.random.default_rng(5)
    distances, ids, values, query_ids = make_data(rng, n=30)
    big = (values.astype(np.int64) * 70_000_000 + 11).astype(np.int32)
    assert big.max() > 2**30
    path = tmp_path / "values.i32"
    big.tofile(path)
    mm = np.memmap(path, dtype=np.int32, mode="r")
    got = knn_distributions(distances, ids, mm, 1.5, query_ids=query_ids)
    assert_matches(got, reference(distances, ids, big, 1.5, query_ids=query_ids))
    # Narrow and wide integer dtypes give the same answer.
    base = knn_distributions(distances, ids, values, 1.5)
    for dtype in (np.uint16, np.int64, np.uint32, np.uint64):
        other = knn_distributions(distances, ids, values.astype(dtype), 1.5)
        for a, b in zip(base, other):
            np.testing.assert_array_equal(a, b)


def test_empty_input_and_csr_offsets():
    counts, toks, probs = knn_distributions(
        np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int64), np.arange(3, dtype=np.int32), 1.0
    )
    assert counts.shape == toks.shape == probs.shape == (0,)
    np.testing.assert_array_equal(csr_offsets(np.array([2, 0, 3])), [0, 2, 2, 5])
    assert csr_offsets(np.array([], dtype=np.int64)).tolist() == [0]
    with pytest.raises(ValueError):
        csr_offsets(np.array([1, -1]))


def test_errors():
    d = np.array([[1.0, 2.0], [3.0, 4.0], [0.5, 0.1]], dtype=np.float32)
    ids = np.array([[0, 1], [2, 3], [1, 2]])
    v = np.arange(5, dtype=np.int32)
    ok = dict(distances=d, neighbor_ids=ids, values=v, temperature=1.0)

    def call(**kw):
        return knn_distributions(**{**ok, **kw})

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=bad)
    with pytest.raises(ValueError, match="k must"):
        call(k=0)
    with pytest.raises(ValueError, match="max_support"):
        call(max_support=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_prob"):
            call(min_prob=bad)
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        call(neighbor_ids=ids[:, :1])
    with pytest.raises(ValueError, match="query_ids"):
        call(query_ids=np.array([0, 1]))
    with pytest.raises(ValueError, match=">= -1"):
        call(neighbor_ids=np.array([[0, -2], [2, 3], [1, 2]]))
    with pytest.raises(ValueError, match="out of range"):
        call(neighbor_ids=np.array([[0, 5], [2, 3], [1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        call(values=v.astype(np.float32))
    with pytest.raises(ValueError, match="1-D"):
        call(values=v[None])
    with pytest.raises(ValueError, match="token id outside"):
        call(values=np.array([0, 1, -4, 3, 4], dtype=np.int32))
    with pytest.raises(ValueError, match="token id outside"):
        call(values=np.array([0, 1, 2**31, 3, 4], dtype=np.uint32))
    # A row left without neighbours: all padding, or only itself after self-exclusion.
    with pytest.raises(ValueError, match="row 1 has no valid neighbour"):
        call(neighbor_ids=np.array([[0, 1], [-1, -1], [1, 2]]))
    with pytest.raises(ValueError, match="row 2 has no valid neighbour"):
        call(neighbor_ids=np.array([[0, 1], [2, 3], [4, 4]]), query_ids=np.array([2, 0, 4]))
    # A NaN / -inf distance of a valid neighbour is an error (padding may hold anything).
    for bad in (np.nan, -np.inf):
        with pytest.raises(ValueError, match="row 1 has a NaN"):
            call(distances=np.array([[1.0, 2.0], [bad, 4.0], [0.5, 0.1]], dtype=np.float32))
    with pytest.raises(ValueError, match="row 1 has a NaN"):  # even where k would drop it
        call(distances=np.array([[1.0, 2.0], [3.0, np.nan], [0.5, 0.1]], dtype=np.float32), k=1)


def test_stored_rows_drop_fp16_zeros_and_renormalise():
    """A row whose tail rounds to 0 in fp16 loses those entries and is renormalised; other rows are untouched."""
    from lightning_memdec.kernels.sparse_targets import stored_rows

    counts = np.array([3, 2])
    ids = np.array([5, 7, 9, 1, 2])
    probs = np.array([0.9, 0.1 - 2e-9, 2e-9, 0.6, 0.4], dtype=np.float32)
    c, i, p = stored_rows(counts, ids, probs)
    assert c.tolist() == [2, 2] and i.tolist() == [5, 7, 1, 2] and i.dtype == np.int32 and p.dtype == np.float16
    want = np.array([0.9, 0.1 - 2e-9], dtype=np.float32) / np.float32(1 - 2e-9)
    np.testing.assert_array_equal(p[:2], want.astype(np.float16))
    np.testing.assert_array_equal(p[2:], np.array([0.6, 0.4], dtype=np.float16))
    # nothing to drop: the same arrays, cast
    c2, i2, p2 = stored_rows(np.array([2]), np.array([3, 4]), np.array([0.5, 0.5], dtype=np.float32))
    assert c2.tolist() == [2] and p2.tolist() == [0.5, 0.5]
    # a tail large enough for the renormalisation to show in fp16: 40,000 entries of 2.5e-8 (each 0 in fp16), 1e-3
    # of the mass; 0.5 / 0.999 is the next fp16 above 0.5
    tail = np.full(40_000, 2.5e-8, dtype=np.float32)
    probs = np.concatenate([np.array([0.5, 0.499], dtype=np.float32), tail])
    c3, i3, p3 = stored_rows(np.array([len(probs)]), np.arange(len(probs)), probs)
    kept = probs[:2] / np.float32(probs[:2].astype(np.float64).sum())
    assert c3.tolist() == [2] and p3.tolist() == kept.astype(np.float16).tolist() and p3[0] > np.float16(0.5)


def test_min_prob_keeps_the_tokens_at_the_threshold():
    """min_prob is inclusive, in the host kernel and the device one: 4 neighbours at one distance holding tokens
    a, a, b, c give exactly 0.5, 0.25, 0.25, and min_prob 0.25 keeps all three."""
    import torch

    from lightning_memdec.kernels.sparse_targets_torch import knn_distributions_torch

    distances, neighbours, values = np.zeros((1, 4), np.float32), np.arange(4)[None], np.array([7, 7, 3, 9])
    counts, tokens, probs = knn_distributions(distances, neighbours, values, 1.0, min_prob=0.25)
    assert counts.tolist() == [3] and tokens.tolist() == [7, 3, 9] and probs.tolist() == [0.5, 0.25, 0.25]
    got = knn_distributions_torch(torch.from_numpy(distances), torch.from_numpy(values[None]), 1.0, min_prob=0.25)
    assert got[0].tolist() == [3] and got[1].tolist() == [7, 3, 9] and got[2].tolist() == [0.5, 0.25, 0.25]
    assert knn_distributions(distances, neighbours, values, 1.0, min_prob=0.26)[0].tolist() == [1]


def dense_reference(distances, ids, values, temperature, query_ids=None, k=None, max_support=None, min_prob=None):
    """The paper's dense scatter, one row at a time: float32 weights exp((d_min - d) / T) (so a weight underflows
    to 0 exactly where the kernel's does), summed into a dense float64 row over the vocabulary (the distinct token
    ids, kept in order), nonzero(), then sorted by (-prob, token) and truncated like the kernel."""
    vocab, local = np.unique(values, return_inverse=True)
    rows = []
    for i in range(len(distances)):
        valid = ids[i] >= 0
        if query_ids is not None:
            valid &= ids[i] != query_ids[i]
        cols = np.flatnonzero(valid)
        cols = cols[np.lexsort((cols, distances[i, cols]))][:k]  # nearest first, ties by column
        d = distances[i, cols].astype(np.float32)
        w = np.exp((d.min() - d) / np.float32(temperature))
        dense = np.zeros(vocab.size)
        np.add.at(dense, local[ids[i, cols]], w.astype(np.float64))
        p = (dense / dense.sum()).astype(np.float32)
        nz = np.flatnonzero(p > 0)
        nz = nz[np.lexsort((nz, -p[nz]))]  # prob descending, ties by smaller token
        toks, q = vocab[nz], p[nz].astype(np.float64)
        if max_support is not None:
            toks, q = toks[:max_support], q[:max_support] / q[:max_support].sum()
        if min_prob is not None:
            keep = q >= min_prob
            keep[0] = True
            toks, q = toks[keep], q[keep] / q[keep].sum()
        rows.append(list(zip(toks.tolist(), q.tolist())))
    return rows


def test_sort_key_dtype_packs_into_32_bits_when_it_can():
    assert sparse.sort_key_dtype(50256, 1024) == np.uint32  # GPT-2: 16 token bits + 10 column bits
    assert sparse.sort_key_dtype(151_645, 2048) == np.uint32  # Qwen: 18 + 11
    assert sparse.sort_key_dtype(2**22 - 1, 1024) == np.uint32  # exactly 32 bits: the key's top bit is used
    assert sparse.sort_key_dtype(2**22, 1024) == np.uint64  # 33 bits
    assert sparse.sort_key_dtype(2**31 - 1, 2) == np.uint32  # 31 + 1
    assert sparse.sort_key_dtype(2**31 - 1, 3) == np.uint64  # 31 + 2
    assert sparse.sort_key_dtype(0, 1) == np.uint32


def hard_rows(rng, n=64, k=40, vocab=50, offset=0):
    """Rows with every case at once: -1 padding, self-matches, duplicate tokens, distance ties (within a token,
    across tokens, and across the nearest-k cut), prob ties between tokens, underflowing weights."""
    distances, ids, values, query_ids = make_data(rng, n=n, k=k, datastore=400, vocab=vocab)
    distances = np.round(distances / 3).astype(np.float32)  # few distinct distances: many ties
    distances[1::5, -3:] = 1e4  # weights that underflow to exactly 0 (at T <= 50)
    # Row 3: two tokens each with two neighbours at one distance and nothing else: an exact prob tie.
    values[[10, 11, 12, 13]] = [7, 7, 5, 5]
    ids[3] = -1
    ids[3, [4, 9, 17, 30]] = [10, 11, 12, 13]
    distances[3, [4, 9, 17, 30]] = 2.0
    return distances, ids, (values.astype(np.int64) + offset).astype(np.int32), query_ids


# Token bits + 6 column bits (k = 40): 6 + 6; 26 + 6 = 32 exactly (the top bit used); 27 + 6 and 31 + 6 (uint64).
@pytest.mark.parametrize("offset", [0, 2**26 - 50, 2**26, 2**30])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"query_ids": True},
        {"query_ids": True, "k": 35},
        {"k": 1},
        {"query_ids": True, "max_support": 3},
        {"query_ids": True, "min_prob": 0.05},
        {"k": 36, "max_support": 6, "min_prob": 0.1},
    ],
)
def test_both_key_widths_match_the_dense_scatter(settings, offset, monkeypatch):
    distances, ids, values, query_ids = hard_rows(np.random.default_rng(6), offset=offset)
    kw = {**settings, "query_ids": query_ids if settings.get("query_ids") else None}
    default = knn_distributions(distances, ids, values, 3.0, **kw)  # the dense kernel where the token ids fit it
    monkeypatch.setattr(sparse, "_DENSE_MAX_TOKEN", -1)  # from here on, the sort-based path
    chosen = []
    real = sparse.sort_key_dtype
    monkeypatch.setattr(sparse, "sort_key_dtype", lambda *a: chosen.append(real(*a)) or chosen[-1])
    got = knn_distributions(distances, ids, values, 3.0, **kw)
    wide = offset >= 2**26 and settings.get("k") != 1  # k > 32 keeps 6 column bits; k = 1 needs 1
    assert set(chosen) == {np.uint64 if wide else np.uint32}
    want = dense_reference(distances, ids, values, 3.0, **kw)
    assert_matches(got, want)
    for a, b in zip(got, default):  # the same bytes as the default path
        np.testing.assert_array_equal(a, b)
    if settings.get("k") != 1:  # the exact tie in row 3 is kept, smaller token first
        row = split_rows(*got)[3]
        assert [t for t, _ in row] == [offset + 5, offset + 7] and row[0][1] == row[1][1] == 0.5
    # The other key width gives the same bytes.
    monkeypatch.setattr(sparse, "sort_key_dtype", lambda *a: np.uint64 if real(*a) == np.uint32 else np.uint32)
    if not wide:
        for a, b in zip(got, knn_distributions(distances, ids, values, 3.0, **kw)):
            np.testing.assert_array_equal(a, b)


def test_underflowed_weights_drop_only_their_own_token():
    # Token 4's only neighbour underflows; token 9 has one underflowing and one live neighbour.
    distances = np.array([[0.0, 200.0, 200.0, 1.0, -1.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2, 3, -1]])
    values = np.array([9, 4, 9, 6], dtype=np.int32)
    counts, toks, probs = knn_distributions(distances, ids, values, 1.0)
    want = dense_reference(distances, ids, values, 1.0)
    assert_matches((counts, toks, probs), want)
    assert toks.tolist() == [9, 6] and probs[0] == np.float32(1 / (1 + np.exp(np.float32(-1))))


@pytest.mark.parametrize("top", [65535, 65536])  # the largest token a uint16 lookup table holds, and one more
def test_short_and_long_lookup_tables_agree(top):
    """A table with no more entries than lookups may be gathered from a narrower copy: same bytes as a long one."""
    distances, ids, values, query_ids = make_data(np.random.default_rng(7), n=30)
    values = values.astype(np.int64)
    values[values == 3] = top
    short = knn_distributions(distances, ids, values, 1.5, query_ids=query_ids)
    long = knn_distributions(
        distances, ids, np.concatenate([values, np.zeros(10**4, values.dtype)]), 1.5, query_ids=query_ids
    )
    assert values.size <= ids.size < values.size + 10**4
    for a, b in zip(short, long):
        np.testing.assert_array_equal(a, b)
    assert top in short[1]
    assert_matches(short, reference(distances, ids, values, 1.5, query_ids=query_ids))
