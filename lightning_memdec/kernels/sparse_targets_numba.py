"""The compiled (numba) row kernel of `kernels.sparse_targets.knn_distributions`: weights -> rows sorted by prob.

Each row's weights are added into a dense float64 scratch array over the token ids, in ascending column order,
and a two-level bitmap marks the tokens touched; reading the bitmap lists them in ascending token order and
resets what was touched. That is O(k) per row (plus the bitmap words touched), instead of grouping equal tokens
with a sort. The sums are bit-identical to numpy's sort-based path: each token's sum starts at 0.0 and adds its
neighbours' float64 weights in ascending column order, as ``np.add.at`` does there, and a row's total is
numpy's ``np.add.reduceat`` (its first run plus numpy's pairwise sum of the rest, in token order), replicated by
:func:`segment_sum`. The row is then ordered by prob descending, ties keeping the smaller token first, by sorting
unique keys ``inverted prob bits << 32 | token``: one counting pass into about four buckets per key over the range
of the row's prob bits (float bits are nearly logarithmic, so the buckets fill evenly), then one insertion sort
mends the keys sharing a bucket (a crowded row, e.g. many equal probs, goes to ``np.sort`` instead).

The scratch holds one float64 per token id: :data:`DENSE_MAX_TOKEN` bounds it (32 MiB); larger token ids take
the sort-based path. Compiled functions are cached on disk (``cache=True``) and release the GIL, so the caller's
threads run them in parallel. No recursion (numba's on-disk cache crashed on a recursive function here).
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["DENSE_MAX_TOKEN", "DenseRows", "lowest_set_bit", "segment_sum"]

#: The largest token id the dense scratch is made for (2**22 float64 = 32 MiB per thread).
DENSE_MAX_TOKEN = (1 << 22) - 1
_P_INV = 0x7FFFFFFF  # inverted prob bits: larger prob -> smaller key
_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE: pairwise sums split above it
_SMALL_ROW = 32  # rows of at most this many keys are sorted by insertion alone
_CROWDED = 64  # a bucket of more keys than this: the row is sorted by np.sort instead


class DenseRows:
    """A block's rows, built chunk by chunk: each call takes a chunk's weights [rows, width] float32 and tokens
    [rows, width] (every token at most `max_token`) and appends its rows, sorted by prob descending, to the block's
    CSR arrays; :meth:`parts` gives them as one (counts int64, token ids int32, probs float32) piece.

    One instance per block, so per thread: it owns the scratch (left all zero after every row) and output buffers
    for `capacity` entries (the block's rows times width: pages past the rows' support are never touched).
    """

    def __init__(self, max_token: int, capacity: int):
        if not 0 <= max_token <= DENSE_MAX_TOKEN:
            raise ValueError(f"token ids up to {max_token} do not fit the dense scratch (at most {DENSE_MAX_TOKEN})")
        self.sums = np.zeros(max_token + 1, dtype=np.float64)
        self.level1 = np.zeros(max_token // 64 + 1, dtype=np.uint64)  # bit t: token t touched
        self.level2 = np.zeros(self.level1.size // 64 + 1, dtype=np.uint64)  # bit j: level1 word j nonzero
        self.toks, self.bits = np.empty(capacity, dtype=np.int32), np.empty(capacity, dtype=np.uint32)
        self.counts: list[np.ndarray] = []
        self.size = 0

    def __call__(self, w: np.ndarray, tok: np.ndarray) -> None:
        w = np.ascontiguousarray(w, dtype=np.float32)
        if tok.dtype != np.uint16:  # two compiled signatures at most: uint16 or int32 tokens
            tok = tok.astype(np.int32, copy=False)
        tok = np.ascontiguousarray(tok)
        if self.size + w.size > self.toks.size:
            raise ValueError(f"{w.size} more entries overflow a block of {self.toks.size}")
        counts = np.empty(w.shape[0], dtype=np.int64)
        args = (self.sums, self.level1, self.level2, self.toks[self.size :], self.bits[self.size :], counts)
        self.size += _dense_rows(w, tok, *args)
        self.counts.append(counts)

    def parts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The rows so far as one CSR piece (views of the output buffers)."""
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, dtype=np.int64)
        return [(counts, self.toks[: self.size], self.bits[: self.size].view(np.float32))]


@njit(nogil=True, cache=True)
def _dense_rows(w, tok, sums, level1, level2, out_tok, out_bits, counts):
    """All rows of a chunk: scatter, list the touched tokens, probs, sort; returns the entries written."""
    width = w.shape[1]
    run_tok, run_sum = np.empty(width, dtype=np.int64), np.empty(width, dtype=np.float64)
    prob, keys, spare = np.empty(width, np.float32), np.empty(width, np.uint64), np.empty(width, np.uint64)
    starts = np.empty(8 * width + 1, dtype=np.int64)  # bucket offsets: fewer than 8 buckets per key, plus the end
    stack, partial = np.empty((64, 3), dtype=np.int64), np.empty(64, dtype=np.float64)  # for segment_sum
    pos = 0
    for r in range(w.shape[0]):
        _scatter(w[r], tok[r], sums, level1, level2)
        m = _touched(sums, level1, level2, run_tok, run_sum)
        total = segment_sum(run_sum, 0, m, stack, partial)
        n = _prob_keys(run_tok, run_sum, m, total, prob, keys)
        _sort_keys(keys, spare, n, starts, out_tok[pos : pos + n], out_bits[pos : pos + n])
        counts[r] = n
        pos += n
    return pos


@njit(nogil=True, cache=True)
def _scatter(w, tok, sums, level1, level2):
    """Add the row's weights into its tokens' sums, in ascending column order; mark the tokens in the bitmaps."""
    one = np.uint64(1)
    for c in range(tok.size):
        t = np.int64(tok[c])
        sums[t] += np.float64(w[c])
        level1[t >> 6] |= one << np.uint64(t & 63)
        level2[t >> 12] |= one << np.uint64((t >> 6) & 63)


@intrinsic
def _count_trailing_zeros(typingctx, x):
    """LLVM's ``cttz`` on a uint64: one ``tzcnt``/``bsf`` instruction (numba has no public function for it)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        cttz = builder.module.declare_intrinsic("llvm.cttz", [i64], ir.FunctionType(i64, [i64, ir.IntType(1)]))
        return builder.call(cttz, [args[0], ir.Constant(ir.IntType(1), 0)])  # 0: defined (64) for x = 0

    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=True)
def lowest_set_bit(x):
    """The position of the lowest set bit of a non-zero uint64 ``x``."""
    return np.int64(_count_trailing_zeros(x))


@njit(nogil=True, cache=True)
def _touched(sums, level1, level2, run_tok, run_sum):
    """The touched tokens in ascending order with their sums; resets those sums and the bitmap words to 0."""
    one = np.uint64(1)
    m = 0
    for j in range(level2.size):
        top = level2[j]
        if top == 0:
            continue
        level2[j] = 0
        while top:
            i = j * 64 + lowest_set_bit(top)
            top &= top - one
            word = level1[i]
            level1[i] = 0
            while word:
                t = i * 64 + lowest_set_bit(word)
                word &= word - one
                run_tok[m] = t
                run_sum[m] = sums[t]
                sums[t] = 0.0
                m += 1
    return m


@njit(nogil=True, cache=True)
def _prob_keys(run_tok, run_sum, m, total, prob, keys):
    """The runs' probs as float32 (sum / row total, as numpy rounds them); keys ``inverted prob bits << 32 |
    token`` of the nonzero ones, in token order. Returns how many keys."""
    for i in range(m):
        prob[i] = np.float32(run_sum[i] / total)
    bits = prob.view(np.uint32)
    n = 0
    for i in range(m):
        if bits[i] == 0:  # zero probability (only dropped or underflowed neighbours): not in the row
            continue
        inv = np.uint32(_P_INV) - bits[i]
        keys[n] = (np.uint64(inv) << np.uint64(32)) | np.uint64(run_tok[i])
        n += 1
    return n


@njit(nogil=True, cache=True)
def _sort_keys(keys, spare, n, starts, out_tok, out_bits):
    """keys[:n] (unique) in ascending order, written out as tokens and prob bits to `out_tok`, `out_bits` [n].

    A counting pass puts each key in bucket ``(high bits - lowest) >> shift``, with about four buckets per key
    (`starts` holds their offsets), in `spare`: bucket order is key order, so one insertion sort then only mends the
    few keys that share a bucket. A bucket holding more than :data:`_CROWDED` keys (e.g. many equal probs) would
    make that quadratic: then ``np.sort`` sorts the whole row."""
    if n <= _SMALL_ROW:
        _insertion_sort(keys, 0, n)
        _write_out(keys, n, out_tok, out_bits)
        return
    low = np.int64(keys[0] >> np.uint64(32))
    high = low
    for i in range(1, n):
        h = np.int64(keys[i] >> np.uint64(32))
        low, high = min(low, h), max(high, h)
    buckets = 1
    while buckets < 4 * n:
        buckets *= 2
    shift = 0
    while ((high - low) >> shift) >= buckets:  # the span of high bits split into at most `buckets`
        shift += 1
    nb = ((high - low) >> shift) + 1
    starts[: nb + 1] = 0
    for i in range(n):
        starts[((np.int64(keys[i] >> np.uint64(32)) - low) >> shift) + 1] += 1
    crowded = False
    for b in range(nb):
        crowded |= starts[b + 1] > _CROWDED
        starts[b + 1] += starts[b]
    if crowded:
        spare[:n] = np.sort(keys[:n])
    else:
        for i in range(n):  # stable scatter into the buckets
            b = (np.int64(keys[i] >> np.uint64(32)) - low) >> shift
            spare[starts[b]] = keys[i]
            starts[b] += 1
        _insertion_sort(spare, 0, n)
    _write_out(spare, n, out_tok, out_bits)


@njit(nogil=True, cache=True)
def _write_out(keys, n, out_tok, out_bits):
    """Sorted keys[:n] -> tokens (the low 32 bits) and prob bits (the high 32, un-inverted)."""
    for i in range(n):
        out_tok[i] = np.int32(keys[i] & np.uint64(0xFFFFFFFF))
        out_bits[i] = np.uint32(_P_INV) - np.uint32(keys[i] >> np.uint64(32))


@njit(nogil=True, cache=True)
def _insertion_sort(keys, lo, hi):
    """keys[lo:hi] in ascending order, in place."""
    for i in range(lo + 1, hi):
        key = keys[i]
        j = i - 1
        while j >= lo and keys[j] > key:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = key


@njit(nogil=True, cache=True)
def segment_sum(a, lo, hi, stack, partial):
    """``np.add.reduceat`` of float64 `a` for the segment [lo, hi), bit for bit: its first element plus numpy's
    pairwise sum of the rest. `stack` int64 [64, 3] and `partial` float64 [64] are scratch space."""
    return a[lo] + _pairwise_sum(a, lo + 1, hi - lo - 1, stack, partial)


@njit(nogil=True, cache=True)
def _pairwise_sum(a, lo, n, stack, partial):
    """numpy's pairwise float64 sum of a[lo:lo + n] (``pairwise_sum_DOUBLE``, the add.reduce / reduceat inner
    loop), bit for bit: blocks of at most 128 summed by 8 interleaved accumulators, split at n // 2 rounded down
    to a multiple of 8 above that. The recursion runs on an explicit stack of (start, size, halves pushed) frames
    [64, 3] (depth < 64 for any n), `partial` [64] holding the finished sums in order."""
    if n <= _PW_BLOCK:
        return _pairwise_block(a, lo, n)
    stack[0, 0], stack[0, 1], stack[0, 2] = lo, n, 0
    top, done = 1, 0
    while top:
        start, size, pushed = stack[top - 1, 0], stack[top - 1, 1], stack[top - 1, 2]
        if size <= _PW_BLOCK:
            partial[done] = _pairwise_block(a, start, size)
            done, top = done + 1, top - 1
            continue
        half = size // 2
        half -= half % 8
        if pushed < 2:  # push the left half, then the right half
            stack[top - 1, 2] = pushed + 1
            stack[top, 0], stack[top, 1] = (start, half) if pushed == 0 else (start + half, size - half)
            stack[top, 2] = 0
            top += 1
        else:  # both halves done: left + right
            partial[done - 2] = partial[done - 2] + partial[done - 1]
            done, top = done - 1, top - 1
    return partial[0]


@njit(nogil=True, cache=True)
def _pairwise_block(a, lo, n):
    """numpy's pairwise sum of at most 128 elements: plain below 8, else 8 accumulators then the tail."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = lo + 8
    end = lo + n - n % 8
    while i < end:
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        res += a[i]
        i += 1
    return res
