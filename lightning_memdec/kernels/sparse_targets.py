"""Vectorised kNN search results -> sparse next-token distributions (the Memory Decoder's targets).

The paper's code builds each target by scattering neighbour weights into a dense vocabulary row and
calling ``nonzero()``: O(V) work per query, in a Python loop. Here numpy computes a chunk of rows' weights at once,
and a compiled kernel (:mod:`kernels.sparse_targets_numba`) builds each row in O(k): it adds the weights into a
per-thread dense scratch over the token ids, lists the touched tokens from a bitmap (in token order, resetting only
them), then orders the row by probability (a bucket pass and an insertion sort). Its sums are bit-identical to the
sort-based path's (each token's weights added in ascending column order, the row total as ``np.add.reduceat``
computes it), so the two paths give the same bytes; the kernel takes about half the CPU time (k = 1024 to 2048;
less gain at k = 256).

The sort-based path is kept for token ids above the scratch's range (:data:`DENSE_MAX_TOKEN`, 2**22 - 1): O(k log k)
per row, one batched sort groups equal tokens, a segmented sum merges them, and a second sort orders each row by
probability. Both sorts run on packed integer keys (numpy's SIMD sort is several times faster than an argsort, and
the payload rides along for free): the first key is ``token << c | column`` (uint32 when it fits, see
:func:`sort_key_dtype`; the column gathers the weights), the second ``(row parity | inverted prob bits) << 32 |
token``. Positive float32 bit patterns order like the floats they encode.

Rows stay sorted by prob because the training data path reads a prefix of each row for ``max_support`` at every
epoch; the sort is paid once here. Rows go in blocks to a few threads (numpy and the kernel release the GIL), each
block in cache-sized chunks; the random gather of the neighbours' tokens, the main memory cost, reads a uint16 copy
of a short enough table.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lightning_memdec.kernels.scoring import knn_scores
from lightning_memdec.kernels.sparse_targets_numba import DENSE_MAX_TOKEN, DenseRows

__all__ = ["knn_distributions", "csr_offsets", "sort_key_dtype", "stored_rows", "worker_threads"]

# Elements (rows * neighbours) per chunk: ~128k keeps a chunk's temporaries in cache. A block (the
# unit handed to a thread) gathers its tokens in one go.
_CHUNK_ELEMENTS = 1 << 17
_BLOCK_ELEMENTS = 1 << 20
_DENSE_MAX_TOKEN = DENSE_MAX_TOKEN  # larger token ids take the sort-based path (the tests lower it)
_P_INV = 0x7FFFFFFF  # inverted prob bits: larger prob -> smaller key; prob 0 -> largest
_LOW = 0 if sys.byteorder == "little" else 1  # index of the low uint32 half of a uint64


def csr_offsets(counts: np.ndarray) -> np.ndarray:
    """Row start offsets (length n+1, int64) into the flat token/prob arrays for per-row `counts`."""
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def worker_threads() -> int:
    """CPUs this process may run on: how many threads share the row blocks."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def sort_key_dtype(max_token: int, width: int) -> type[np.unsignedinteger]:
    """The dtype of the packed ``token << c | column`` sort keys for token ids up to `max_token` in rows of
    `width` neighbours (c = bits of a column index): uint32 when they fit in 32 bits, else uint64."""
    col_bits = max(1, (width - 1).bit_length())
    return np.uint32 if max(1, max_token.bit_length()) + col_bits <= 32 else np.uint64


def _nearest_keys(d: np.ndarray) -> np.ndarray:
    """uint64 keys ``ordered distance bits << 32 | column`` [rows, width]: ascending = nearest first, ties by column."""
    bits = d.view(np.uint32)
    # Order-preserving float32 -> uint32 map, so the distance can lead a packed uint64 sort key.
    ordered = np.where(bits >> np.uint32(31) == 1, ~bits, bits | np.uint32(0x80000000))
    return (ordered.astype(np.uint64) << np.uint64(32)) | np.arange(d.shape[1], dtype=np.uint64)


def _nearest(d: np.ndarray, tok: np.ndarray, k: int):
    """Keep the k nearest neighbours of each row (invalid ones are +inf); ties: earlier column first.

    When k is close to the width (FAISS's k + 1 with self-exclusion), most rows already have at most k finite
    distances: only the others are touched, their extra neighbours set to +inf (weight 0), and the arrays keep their
    width. For a much smaller k, every row is cut down to its k nearest ([rows, k]), so later steps work on k columns.
    """
    if 2 * k < d.shape[1]:
        pick = _nearest_keys(d)
        pick.sort(axis=1)
        pick = (pick[:, :k] & np.uint64(0xFFFFFFFF)).astype(np.intp)
        return np.take_along_axis(d, pick, 1), np.take_along_axis(tok, pick, 1)
    over = np.flatnonzero(np.count_nonzero(d < np.inf, axis=1) > k)  # rows with more than k to choose from
    if over.size:
        sub = d[over]
        key = _nearest_keys(sub)
        key.partition(k, axis=1)  # keys are distinct: the k smallest are exactly the k nearest
        beyond = (key[:, k:] & np.uint64(0xFFFFFFFF)).astype(np.intp)
        np.put_along_axis(sub, beyond, np.float32(np.inf), axis=1)
        d = d.copy()
        d[over] = sub
    return d, tok


def _lookup_table(values: np.ndarray, gathers: int) -> np.ndarray:
    """`values` as a uint16 copy when every token id fits and the table has no more entries than the gathers from it.

    The random gathers of the neighbours' tokens are the kernel's main memory cost; a table of half the bytes stays
    in cache far better, and reading it once (three sequential passes) costs less than those gathers save. A table
    with more entries than lookups (a large datastore's memmap) is left alone: only the entries needed are read.
    """
    if values.dtype.itemsize <= 2 or values.size > gathers or values.size == 0:
        return values
    if values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        return values
    return values.astype(np.uint16)


def _block(d, ids, qids, values, temperature, k, row0):
    """Rows [row0, row0 + len(d)): gather their tokens in one pass, then process cache-sized chunks.

    The random gather from `values` runs several times faster back to back than interleaved with
    the other work, which evicts `values` from the cache.
    """
    ids = np.asarray(ids, dtype=np.int64)
    id_min, id_max = int(ids.min()), int(ids.max())
    if id_min < -1:
        raise ValueError(f"neighbor_ids must be >= -1 (-1 = missing), found {id_min}")
    if id_max >= values.shape[0]:
        raise ValueError(f"neighbor id {id_max} is out of range for a datastore of {values.shape[0]} entries")
    tok = np.take(values, ids, mode="clip")  # -1 clips to entry 0; masked out in _chunk
    # Token ids are returned as int32 (and packed into at most 31 bits of a sort key).
    tok_min, tok_max = int(tok.min()), int(tok.max())
    if tok_min < 0 or tok_max > np.iinfo(np.int32).max:
        raise ValueError("values holds a token id outside [0, 2**31)")
    step = max(1, _CHUNK_ELEMENTS // ids.shape[1])
    rows_of = DenseRows(tok_max, tok.size) if tok_max <= _DENSE_MAX_TOKEN else _SortedRows(tok_max)
    for a in range(0, len(ids), step):
        qa = None if qids is None else qids[a : a + step]
        _chunk(d[a : a + step], ids[a : a + step], qa, tok[a : a + step], temperature, k, row0 + a, id_min < 0, rows_of)
    return rows_of.parts()


def _chunk(d, ids, qids, tok, temperature, k, row0, padded, rows_of):
    """One chunk of rows -> its weights and tokens, handed to `rows_of` (a :class:`DenseRows` or
    :class:`_SortedRows`), which appends them as untruncated CSR rows sorted by prob."""
    d = np.asarray(d, dtype=np.float32)
    if padded or qids is not None:
        valid = ids >= 0
        if qids is not None:
            valid &= ids != np.asarray(qids, dtype=np.int64)[:, None]
        if not valid.all():
            empty = ~valid.any(axis=1)
            if empty.any():
                raise ValueError(
                    f"row {row0 + int(np.flatnonzero(empty)[0])} has no valid neighbour "
                    "(all ids are -1 or the query itself)"
                )
            d = np.where(valid, d, np.float32(np.inf))  # weight exp(-inf) = 0
    if k is not None and k < d.shape[1]:
        if np.isnan(d).any():  # checked here, as the nearest k might leave the NaN out
            raise ValueError(f"row {row0 + int(np.flatnonzero(np.isnan(d).any(axis=1))[0])} has a NaN distance")
        d, tok = _nearest(d, tok, k)
    d_min = d.min(axis=1, keepdims=True)  # NaN and -inf propagate here, so this also validates d
    if not np.isfinite(d_min).all():
        row = int(np.flatnonzero(~np.isfinite(d_min[:, 0]))[0])
        raise ValueError(f"row {row0 + row} has a NaN or -inf distance (or no finite one)")
    # Weights exp(-(d - d_min) / T) in (0, 1]; dropped neighbours weigh exactly 0, so they add nothing to their
    # token's sum, and a run of only them is dropped as zero-probability below.
    w = knn_scores(d, temperature, nearest=d_min)  # contiguous: numpy's SIMD exp does not vectorise a strided output
    np.exp(w, out=w)
    rows_of(w, tok)


class _SortedRows:
    """The sort-based path (token ids above the dense scratch's range), with :class:`DenseRows`' interface: each
    call turns a chunk's weights and tokens [rows, width] into CSR rows; :meth:`parts` lists the chunks' pieces."""

    def __init__(self, tok_max: int):
        self.tok_max, self.pieces = tok_max, []

    def __call__(self, w: np.ndarray, tok: np.ndarray) -> None:
        self.pieces.append(_by_prob(*_token_runs(w, tok, self.tok_max)))

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self.pieces


def _token_runs(w, tok, tok_max):
    """Group each row's neighbours by token: (run tokens [m], run weight sums [m] float64, row starts [rows + 1]).

    One sort of packed keys ``token << c | column`` (c = bits of a column index) yields both the grouping (equal
    tokens adjacent, by column within a token) and the permutation (the low c bits) to gather the weights with.
    The keys are uint32 when they fit (numpy's SIMD sort is fastest on them: a 50k vocabulary needs 16 token bits,
    k = 1024 10 column bits), uint64 otherwise (token ids up to 2**31 - 1, any k); see :func:`sort_key_dtype`.
    """
    rows, width = w.shape
    col_bits = max(1, (width - 1).bit_length())
    kt = sort_key_dtype(tok_max, width)
    key = tok.astype(kt)  # [rows, width]
    key <<= kt(col_bits)
    key |= np.arange(width, dtype=kt)
    key.sort(axis=1)
    flat = key & kt((1 << col_bits) - 1)  # [rows, width] column of each sorted neighbour...
    flat += np.arange(0, rows * width, width, dtype=kt)[:, None]  # ...as a flat index into w
    weight = np.take(w, flat).ravel().astype(np.float64)  # [rows * width] sorted like the keys
    key >>= kt(col_bits)  # [rows, width] token ids, ascending within each row
    start = np.empty((rows, width), dtype=bool)  # first neighbour of a run of equal tokens
    start[:, 0] = True
    np.not_equal(key[:, 1:], key[:, :-1], out=start[:, 1:])
    start = start.ravel()
    starts = np.flatnonzero(start)  # [m] flat index of each run's first neighbour
    run = start.astype(np.intp)  # [rows * width] run number of every neighbour, from 1 (intp: add.at's fast path)
    np.cumsum(run, out=run)
    sums = np.zeros(starts.size + 1)  # float64: exact enough to renormalise and threshold against
    np.add.at(sums, run, weight)
    sums = sums[1:]
    row_start = np.searchsorted(starts, np.arange(0, rows * width + 1, width))  # every row starts a run
    return key.ravel()[starts], sums, row_start


def _by_prob(run_tok, sums, row_start):
    """Runs -> CSR (counts [rows], token ids [m] int32, probs [m] float32), each row sorted by prob descending.

    Ties go to the smaller token. The sort runs on packed uint64 keys ``(row parity | 0x7FFFFFFF - prob bits) << 32
    | token``, two rows at a time (sorting is n log n, and the runs are already grouped by row).
    """
    rows = row_start.size - 1
    counts = np.diff(row_start)
    probs = (sums / np.repeat(np.add.reduceat(sums, row_start[:-1]), counts)).astype(np.float32)
    # Zero-probability runs (only dropped neighbours, or underflowed weights) go, as nonzero() does.
    nonzero = probs > 0
    if not nonzero.all():
        run_row = np.repeat(np.arange(rows), counts)[nonzero]
        probs, run_tok = probs[nonzero], run_tok[nonzero]
        row_start = np.searchsorted(run_row, np.arange(rows + 1))
        counts = np.diff(row_start)
    key = np.empty(probs.size, dtype=np.uint64)  # [m], written through its uint32 halves
    halves = key.view(np.uint32).reshape(-1, 2)
    low, high = halves[:, _LOW], halves[:, 1 - _LOW]
    np.subtract(np.uint32(_P_INV), probs.view(np.uint32), out=high)
    high |= np.repeat(np.arange(rows, dtype=np.uint32) << np.uint32(31), counts)  # row parity in the top bit
    np.copyto(low, run_tok, casting="unsafe")
    bounds = row_start[::2].tolist() + [key.size]
    for a, b in zip(bounds[:-1], bounds[1:]):
        key[a:b].sort()
    inv = high & np.uint32(_P_INV)
    np.subtract(np.uint32(_P_INV), inv, out=inv)
    return counts, low.astype(np.int32), inv.view(np.float32)


def _concatenate(parts, pool=None, threads=1):
    """The chunks' CSR pieces as one (counts int64, token ids, probs); a pool copies them in `threads` slices."""
    counts = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
    ends = np.cumsum([p[1].size for p in parts])
    toks, probs = np.empty(ends[-1], np.int32), np.empty(ends[-1], np.float32)
    cut = np.linspace(0, len(parts), threads + 1).astype(int)  # part i goes to [ends[i-1], ends[i])

    def copy(i):
        a, b = cut[i], cut[i + 1]
        lo, hi = (ends[a - 1] if a else 0), (ends[b - 1] if b else 0)
        if b > a:
            np.concatenate([p[1] for p in parts[a:b]], out=toks[lo:hi])
            np.concatenate([p[2] for p in parts[a:b]], out=probs[lo:hi])

    if pool is None:
        copy(0)
    else:
        list(pool.map(copy, range(threads)))
    return counts, toks, probs


def _truncate(counts, toks, probs, max_support, min_prob):
    """Apply max_support then min_prob (each followed by renormalisation) to sorted CSR rows."""
    offsets = csr_offsets(counts)
    row = np.repeat(np.arange(counts.size), counts)
    rank = np.arange(probs.size) - offsets[row]
    keep_n = counts.copy()
    if max_support is not None:
        keep_n = np.minimum(keep_n, max_support)
    if min_prob is not None:
        kept = np.where(rank < keep_n[row], probs, np.float32(0))
        renorm = kept / np.add.reduceat(kept, offsets[:-1])[row]
        # Rows are sorted descending, so the tokens passing the threshold form a prefix.
        passing = np.bincount(row, weights=(renorm >= min_prob) & (rank < keep_n[row]), minlength=counts.size)
        keep_n = np.maximum(passing.astype(np.int64), 1)
    keep = rank < keep_n[row]
    toks, probs = toks[keep], probs[keep]
    probs /= np.repeat(np.add.reduceat(probs, csr_offsets(keep_n)[:-1]), keep_n)
    return keep_n, toks, probs


def knn_distributions(
    distances: np.ndarray,
    neighbor_ids: np.ndarray,
    values: np.ndarray,
    temperature: float,
    query_ids: np.ndarray | None = None,
    k: int | None = None,
    max_support: int | None = None,
    min_prob: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse kNN next-token distributions p(y) = sum_{j: values[id_j] = y} softmax_j(-d_j / T).

    The softmax's logits are :func:`lightning_memdec.kernels.scoring.knn_scores` (as for kNN-LM's log p_kNN(gold)).

    Inputs: `distances` [n, k] squared L2 (rows in any order), `neighbor_ids` [n, k] with -1 for
    missing neighbours, `values` [N] token id per datastore entry (a memmap is fine: only the
    needed entries are read). `query_ids` drops a neighbour whose id equals the query's own datastore
    id (self-exclusion by id, wherever it sits in the row). `k` keeps the nearest k remaining
    neighbours (distance ties: earlier column first). Truncation, applied in this order, each followed
    by renormalisation: `max_support` keeps the top tokens; `min_prob` drops tokens whose
    (renormalised) prob is below it but always keeps the top token. Tokens whose weight underflows
    to exactly 0 in float32 are dropped, as the dense ``nonzero()`` reference does.

    Returns CSR arrays (counts [n] int64, token_ids [sum(counts)] int32, probs [sum(counts)]
    float32); each row sorted by prob descending (ties: smaller token id first) and summing to 1
    (up to float32 rounding). Raises ValueError for bad arguments, a NaN or -inf distance of a
    kept neighbour (+inf just weighs 0), token ids outside [0, 2**31), or a row left without
    neighbours (naming the row).
    """
    distances = np.asarray(distances)
    neighbor_ids = np.asarray(neighbor_ids)
    if not isinstance(values, np.ndarray):
        values = np.asarray(values)
    if query_ids is not None:
        query_ids = np.asarray(query_ids)
    _validate(distances, neighbor_ids, values, temperature, query_ids, k, max_support, min_prob)
    n, width = distances.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    values = _lookup_table(values, neighbor_ids.size)
    step = max(1, _BLOCK_ELEMENTS // width)

    def work(lo: int):
        hi = min(n, lo + step)
        qids = None if query_ids is None else query_ids[lo:hi]
        return _block(distances[lo:hi], neighbor_ids[lo:hi], qids, values, temperature, k, lo)

    starts = range(0, n, step)
    threads = min(worker_threads(), len(starts))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            parts = [part for block in pool.map(work, starts) for part in block]
            counts, toks, probs = _concatenate(parts, pool, threads)
    else:
        counts, toks, probs = _concatenate([part for lo in starts for part in work(lo)])
    if max_support is not None or min_prob is not None:
        counts, toks, probs = _truncate(counts, toks, probs, max_support, min_prob)
    return counts, toks, probs


def _validate(distances, neighbor_ids, values, temperature, query_ids, k, max_support, min_prob):
    if distances.ndim != 2 or neighbor_ids.shape != distances.shape:
        raise ValueError(
            f"distances and neighbor_ids must both be [n, k]; got {distances.shape} and {neighbor_ids.shape}"
        )
    if distances.shape[0] and distances.shape[1] == 0:
        raise ValueError("row 0 has no valid neighbour (zero neighbour columns)")
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D (one token id per datastore entry), got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"values must hold integer token ids, got dtype {values.dtype}")
    if not np.issubdtype(neighbor_ids.dtype, np.integer):
        raise ValueError(f"neighbor_ids must be integers, got dtype {neighbor_ids.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    for name, v in (("k", k), ("max_support", max_support)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    if min_prob is not None and not (0.0 <= min_prob <= 1.0):
        raise ValueError(f"min_prob must lie in [0, 1], got {min_prob!r}")
    if query_ids is not None and query_ids.shape != (distances.shape[0],):
        raise ValueError(f"query_ids must have shape ({distances.shape[0]},), got {query_ids.shape}")


def stored_rows(counts: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows as stored on disk: int32 ids, fp16 probabilities with no entry rounded to 0, rows renormalised.

    fp16 cannot hold a probability below ~6e-8: such tail entries would be kept as zeros (wasted support that
    says "this token is impossible"). They are dropped, and each row's remaining mass is renormalised in fp32
    before the cast, so rows still sum to 1 up to fp16 rounding.
    """
    probs = np.asarray(probs, dtype=np.float32)
    keep = probs.astype(np.float16) > 0
    if keep.all():
        return counts, ids.astype(np.int32), probs.astype(np.float16)
    row = np.repeat(np.arange(len(counts)), counts)
    counts = np.bincount(row[keep], minlength=len(counts)).astype(counts.dtype)
    kept = probs[keep]
    kept /= np.bincount(row[keep], weights=kept, minlength=len(counts))[row[keep]].astype(np.float32)
    return counts, ids[keep].astype(np.int32), kept.astype(np.float16)
