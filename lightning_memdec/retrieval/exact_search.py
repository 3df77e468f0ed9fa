"""Exact k-nearest-neighbour search by blocked matrix products (torch + numpy only, no FAISS).

Queries × key blocks go through one matrix product per block that writes the ranking score ‖k‖² − 2 q·k directly
(``addmm`` onto the block's ‖k‖², computed once per block or passed in cached: no elementwise pass over the
[queries × keys] scores; ‖q‖² is the same for a whole row, so it cannot change a ranking and is never added). Each
block's best candidates are selected by one unsorted ``topk`` (measured on an H200 against a two-stage and a
threshold selection: benchmarks/selection_designs.py), and a running top-k merges them into the best so far; or,
with ``selection="threshold"``, the keys under a sampled per-query threshold are kept (kernels.threshold_select);
or cuVS's brute force selects them (``selection="cuvs"``, resident keys on a GPU: retrieval.cuvs_exact). Keys stream
from the datastore's fp16 memmap in blocks sized to a memory budget (half the free device memory on a GPU,
:data:`DEFAULT_CPU_MEMORY` on the CPU), the next block read by a helper thread while the current one is searched.
On a GPU the products run in fp16 (the keys' own precision) with an fp32 output where torch offers one, else in
bf16; on the CPU in fp32. ``coarse=True`` writes the scores in bf16 (half the bytes of the widest tensor; inputs
rounded to bf16 too) with the wider bf16 re-ranking margin.

Why the matrix-product distances alone are not exact: the expansion subtracts large, nearly equal numbers. For a
near neighbour ‖q − k‖² is much smaller than ‖q‖² + ‖k‖², so an error relative to the norms (fp32 accumulation
order; in bf16 also inputs rounded to 8 significant bits, where the stored fp16 keys have 11, and a product
rounded to bf16 when no fp32 output is available) becomes a large relative error of the distance, and can swap
near-tied neighbours. So the streamed search keeps ``k + margin`` candidates, their distances are recomputed
directly as Σ (q − k)² in fp32 from the gathered keys, and the final top-k is taken on those: reported distances
are exact fp32 ones, ids exact up to candidates that the product form misranked by more than the margin.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lightning_memdec.io.capacity import free_device_memory
from lightning_memdec.io.npy_rows import gather_rows, read_rows
from lightning_memdec.kernels.threshold_select import (
    ThresholdPlan,
    best_in_buffers,
    candidate_buffers,
    choose_selection,
    collect_below,
    needs_fallback,
    threshold_plan,
    triton_kernels,
)
from lightning_memdec.retrieval.cuvs_exact import brute_force_candidates
from lightning_memdec.retrieval.search_budget import (
    DEFAULT_CPU_MEMORY,
    block_rows,
    check_search_budget,
    memory_budget,
    rerank_margin,
    search_fits,
)

__all__ = [
    "EXACT_CPU_MAX_ELEMENTS",
    "EXACT_CPU_SELECTION_WIDTH",
    "EXACT_GPU_MAX_ELEMENTS",
    "SEARCH_BACKENDS",
    "SELECTIONS",
    "choose_search",
    "default_compute_dtype",
    "sample_thresholds",
    "ranking_scores",
    "exact_search",
    "exact_distances",
    "by_distance_then_id",
    "resident_keys",
    "squared_norms",
]

SEARCH_BACKENDS = ("exact", "faiss", "auto")
SELECTIONS = ("auto", "topk", "threshold", "cuvs")  # how each query's candidates are chosen: see exact_search
RESIDENT_FRACTION = 0.4  # of the device's free memory the whole key matrix may take to stay there between searches
# N·(d + EXACT_CPU_SELECTION_WIDTH) up to which exact CPU search is chosen by `auto` (e.g. 80k keys of d = 64, 65k
# of d = 256, 37k of d = 1024): there it costs ≤ 2.5× the fastest FAISS index
# (benchmarks/results/search-backends-cpu-2026-12-06.txt).
EXACT_CPU_MAX_ELEMENTS = 1 << 26
# What choosing the nearest among a row of fp32 scores costs per score on the CPU, in multiply-adds of the product
# (its memory traffic): at d = 64 the selection and the score writes cost ten times the product's 64 (measured by
# benchmarks/search_backends.py), so N·d alone counted a 500k × 64 store as cheap where a query took 10 ms.
EXACT_CPU_SELECTION_WIDTH = 768
# N·d up to which exact GPU search is chosen by `auto` (e.g. 11 M keys of d = 768, 5.4 M of d = 1600): 17 GB of fp16
# keys, resident on an 80 GB card, 17 GFLOP a query (~1,100 queries/s at the H100's measured rate).
EXACT_GPU_MAX_ELEMENTS = 1 << 33
_mm_out_dtype_ok: dict[str, bool] = {}


def choose_search(num_entries: int, dim: int, device_type: str, have_index: bool = True) -> str:
    """The ``auto`` rule of ``build_targets(search=...)``: ``"exact"`` or ``"faiss"``.

    - no index given → exact (the only backend that needs none);
    - a CUDA device → exact when N·d ≤ :data:`EXACT_GPU_MAX_ELEMENTS` (2^33): a dense fp16 product over the whole
      store runs at tensor-core speed, is exact, needs no faiss-gpu, and the keys stay resident on the device. The
      cost per query grows with N·d, so the work of a store's targets grows with N²·d: measured on an H100, 6,249
      queries/s at 2 M × 768; at the paper's 103 M × 1,600 it would be ~58 queries/s, 20 GPU-days (docs/scaling.md),
      where IVF-PQ does ~3,000× less work per query;
    - on the CPU → exact when N·(d + :data:`EXACT_CPU_SELECTION_WIDTH`) ≤ :data:`EXACT_CPU_MAX_ELEMENTS` (2^26):
      a query's product and its selection over N scores (the selection, not the product, dominates at small d)
      then cost at most ~2.5× the fastest FAISS index at k = 1,024 (2.3 against 0.94 ms a query at d = 64 on
      2 cores: benchmarks/results/search-backends-cpu-2026-12-06.txt), where N·d ≤ 2^25 alone let a 500k × 64
      store run ~12× slower;
    - otherwise faiss (the given index: IVF-PQ visits a small fraction of the store per query).
    """
    if not have_index:
        return "exact"
    if device_type == "cuda":
        return "exact" if num_entries * dim <= EXACT_GPU_MAX_ELEMENTS else "faiss"
    return "exact" if num_entries * (dim + EXACT_CPU_SELECTION_WIDTH) <= EXACT_CPU_MAX_ELEMENTS else "faiss"


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on the CPU; on a GPU fp16 when its products can be written in fp32 (no overflow, no rounding of the
    product), else bf16 (fp16's range is too small for a product written back in fp16)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if _mm_with_fp32_output(device) else torch.bfloat16


def _mm_with_fp32_output(device: torch.device) -> bool:
    """Whether ``addmm`` on ``device`` takes fp16 inputs and writes fp32 (``out_dtype``; CUDA only in torch 2.13)."""
    key = str(device)
    if key not in _mm_out_dtype_ok:
        try:
            a = torch.ones(2, 2, dtype=torch.float16, device=device)
            c = torch.zeros(2, dtype=torch.float32, device=device)
            _mm_out_dtype_ok[key] = torch.addmm(c, a, a, alpha=-2, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _mm_out_dtype_ok[key] = False
    return _mm_out_dtype_ok[key]


def ranking_scores(q: torch.Tensor, k: torch.Tensor, k_norm: torch.Tensor, coarse: bool) -> torch.Tensor:
    """‖k‖² − 2 q·kᵀ [n, B] from one ``addmm`` (the squared distance minus the row's constant ‖q‖²): fp32 where the
    inputs are fp32 or an fp32 output is offered; in the inputs' dtype when ``coarse``. Without an fp32 output and
    not coarse, the product alone is rounded and ‖k‖² added in fp32 (two passes, the rounding of the old search)."""
    if q.dtype == torch.float32:
        return torch.addmm(k_norm, q, k.T, alpha=-2)
    if coarse:
        return torch.addmm(k_norm.to(q.dtype), q, k.T, alpha=-2)
    if _mm_with_fp32_output(q.device):
        return torch.addmm(k_norm, q, k.T, alpha=-2, out_dtype=torch.float32)
    return torch.mm(q, k.T).float().mul_(-2).add_(k_norm)


def squared_norms(keys: torch.Tensor) -> torch.Tensor:
    """‖k‖² [N] in fp32 of ``keys`` (where they are), for :func:`exact_search`'s ``key_norms``: computed once for
    resident keys instead of once per search call."""
    out = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
    for b0 in range(0, keys.shape[0], 1 << 16):
        out[b0 : b0 + (1 << 16)] = keys[b0 : b0 + (1 << 16)].float().square().sum(1)
    return out


def _host_blocks(keys, size: int):
    """(start, block) over ``keys``; a numpy/memmap block is read by a helper thread one block ahead."""
    n = keys.shape[0]
    if isinstance(keys, torch.Tensor):
        for b0 in range(0, n, size):
            yield b0, keys[b0 : b0 + size]
        return

    def read(b0: int) -> torch.Tensor:
        return torch.from_numpy(read_rows(keys, b0, b0 + size))  # read, not mapped: RSS stays one block

    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, 0)
        for b0 in range(0, n, size):
            block = ahead.result()
            if b0 + size < n:
                ahead = pool.submit(read, b0 + size)
            yield b0, block


def resident_keys(keys, device: torch.device | str, max_bytes: int | None = None, block: int = 1 << 16):
    """The whole key matrix copied once onto ``device`` (dtype as stored), or None when it is over ``max_bytes``.

    Why: every search call otherwise streams all keys from the host, so building targets in C query chunks moves
    the store C times over PCIe (on an H100, 3 GB per 4,096-query chunk was the bottleneck, not the products).
    The copy goes in blocks of ``block`` rows, so host memory stays O(block). Default ``max_bytes``: a
    :data:`RESIDENT_FRACTION` of the device's free memory (on the CPU: :data:`DEFAULT_CPU_MEMORY`), leaving the
    rest to the search's own working set.
    """
    device = torch.device(device)
    if max_bytes is None:
        free = free_device_memory(device) if device.type == "cuda" else DEFAULT_CPU_MEMORY
        max_bytes = int(free * RESIDENT_FRACTION) if device.type == "cuda" else free
    n, d = keys.shape
    if n * d * keys.dtype.itemsize > max_bytes:
        return None
    dtype = keys.dtype if isinstance(keys, torch.Tensor) else torch.from_numpy(np.zeros(0, keys.dtype)).dtype
    out = torch.empty((n, d), dtype=dtype, device=device)
    for b0, part in _host_blocks(keys, block):
        out[b0 : b0 + len(part)].copy_(part)
    return out


def exact_distances(
    queries: torch.Tensor, keys, ids: torch.Tensor, memory_bytes: int = 256 * 2**20, fused: bool = False
) -> torch.Tensor:
    """Σ (q − k_id)² in fp32 [n, m] for ids [n, m] (+inf where an id is −1, a neighbour FAISS did not find), on the
    queries' device, computed directly: the one exact re-ranking of both search backends (IVF-PQ distances are
    approximate; matrix-product distances lose precision, see the module docstring).

    Keys are gathered from ``keys`` (a numpy memmap: each distinct row read once per query batch, in order, without
    leaving the file mapped; or a torch tensor) in query batches sized to ``memory_bytes``. ``fused``: keys on the
    queries' GPU go through :func:`kernels.threshold_select_triton.gathered_sq_distances` where Triton is installed
    (one pass over the gathered rows; with the threshold selection until it is measured on a GPU).
    """
    n, m = ids.shape
    d = queries.shape[1]
    kernels = triton_kernels(queries.device) if fused and isinstance(keys, torch.Tensor) else None
    if kernels is not None and keys.device == queries.device:  # one pass over the gathered rows, no fp32 copy
        return kernels.gathered_sq_distances(queries.float(), keys, ids.to(queries.device))
    out = torch.empty(n, m, dtype=torch.float32, device=queries.device)
    rows = max(1, memory_bytes // max(1, m * d * 10))
    for a in range(0, n, rows):
        sub = ids[a : a + rows]
        found = sub >= 0
        sub = sub.clamp(min=0)
        if isinstance(keys, torch.Tensor):
            gathered = keys[sub.to(keys.device).reshape(-1)].to(queries.device, torch.float32)
        else:
            flat = sub.reshape(-1).cpu().numpy()
            uniq, inverse = np.unique(flat, return_inverse=True)
            block = torch.from_numpy(gather_rows(keys, uniq)).to(queries.device)
            gathered = block.float()[torch.from_numpy(inverse.reshape(-1)).to(queries.device)]
        diff = gathered.view(len(sub), m, d) - queries[a : a + rows, None, :]
        out[a : a + rows] = torch.where(found.to(out.device), diff.square_().sum(-1), math.inf)
    return out


@torch.no_grad()
def exact_search(
    queries,
    keys,
    k: int,
    query_ids=None,
    device: torch.device | str = "cpu",
    memory_bytes: int | None = None,
    block_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    margin: int | None = None,
    coarse: bool = False,
    key_norms: torch.Tensor | None = None,
    selection: str = "auto",
    complete_ties: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact k nearest keys of every query by squared L2.

    Args:
        queries: [n, d] (numpy or torch, any float dtype; fp16 from a datastore is exact in every compute dtype).
        keys: [N, d] numpy array / ``np.memmap`` (streamed from the host) or a torch tensor (sliced where it is).
        k: neighbours per query, ≤ N (≤ N − 1 with ``query_ids``).
        query_ids: [n] int, the query's own key id to exclude (self-exclusion by id, masked inside its block).
        device: where the products run (``"cuda:1"``, a ``torch.device``, ``"cpu"``).
        memory_bytes: budget for one block's working set (default :func:`memory_budget`).
        block_size: keys per block (default :func:`block_rows` from the budget).
        compute_dtype: dtype of the products (default :func:`default_compute_dtype`).
        margin: extra candidates re-ranked exactly (default :func:`rerank_margin` of the coarsest dtype used); with
            0 and ``complete_ties`` every row is searched twice (the k-th is then always the last candidate).
        coarse: scores written in bf16 (products in bf16 too): half the bytes, a wider margin; the re-ranking keeps
            the result exact up to candidates misranked by more than the margin (tested against brute force).
        key_norms: ‖k‖² [N] fp32 on ``device`` (:func:`squared_norms`), cached by callers with resident keys.
        selection: ``"topk"``, one ``topk`` over each block's score rows; ``"threshold"`` (kernels.threshold_select),
            the keys under a per-query threshold sampled from the store (on a GPU with Triton, by a kernel that never
            writes the score block; rows it cannot serve searched again by ``topk``; ``topk`` where the store is too
            small for a sample or the buffers would take half the budget or leave no room for a key block);
            ``"cuvs"``: cuVS's brute force over keys resident on ``device`` (retrieval.cuvs_exact); the same
            neighbours, ties aside, neither with ``coarse``;
            ``"auto"``: threshold on the CPU for ≥ 1,024 queries over ≥ 192 keys per candidate, else topk
            (threshold_select.choose_selection).
        complete_ties: a tie at the k-th distance that fills every candidate may go on among the keys left out
            (duplicate keys: a repeated context), where the selection kept arbitrary members of it; such rows are
            searched again with twice the candidates until the tie ends inside them, so the k kept are the smallest
            by (distance, id), as brute force and FAISS keep them. It reads back to the host: off in a step a CUDA
            graph captures (kNN-LM).

    Returns (distances [n, k] float32, ids [n, k] int64) on ``device``, each row sorted by (distance, id);
    distances are Σ (q − k)² in fp32 over the gathered keys (see the module docstring).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    if coarse and selection in ("threshold", "cuvs"):
        raise ValueError("coarse=True re-checks bf16 rows against the worst kept score of a topk: use 'topk'.")
    device = torch.device(device)
    compute_dtype = torch.bfloat16 if coarse else compute_dtype or default_compute_dtype(device)
    num_keys, dim = keys.shape
    available = num_keys - (1 if query_ids is not None else 0)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= available:
        raise ValueError(f"k must be a whole number in [1, {available}] for {num_keys} keys, got {k!r}.")
    if key_norms is not None and tuple(key_norms.shape) != (num_keys,):
        raise ValueError(f"key_norms must be [{num_keys}] (one ‖k‖² per key), got {tuple(key_norms.shape)}.")
    if not isinstance(queries, torch.Tensor):
        queries = torch.from_numpy(np.array(queries, dtype=np.float32))  # a copy: memmap slices are read-only
    q32 = queries.to(device, torch.float32)
    n = q32.shape[0]
    if q32.ndim != 2 or q32.shape[1] != dim:
        raise ValueError(f"queries must be [n, {dim}], got {tuple(q32.shape)}.")
    if query_ids is not None and tuple(np.shape(query_ids)) != (n,):
        raise ValueError(f"query_ids must be [{n}], one own key id a query; got shape {tuple(np.shape(query_ids))}.")
    candidates = min(available, k + (rerank_margin(k, compute_dtype) if margin is None else margin))
    budget = memory_budget(device, memory_bytes)
    selection = "topk" if coarse else choose_selection(selection, device.type, n, num_keys, candidates)
    plan = threshold_plan(num_keys, candidates) if selection == "threshold" else None
    buffer_bytes = 0 if plan is None else n * plan.capacity * 12  # fp32 scores + int64 ids a slot
    crowded = not search_fits(n, dim, candidates, budget - buffer_bytes, compute_dtype)
    if buffer_bytes > budget // 2 or (block_size is None and crowded):
        plan, buffer_bytes = None, 0  # the candidate buffers would crowd out the key blocks: topk, which needs none
    if block_size is None:  # the budget sets the blocks: it must hold their fixed part
        check_search_budget(n, dim, candidates, budget - buffer_bytes, compute_dtype)
    own = None if query_ids is None else torch.as_tensor(query_ids, dtype=torch.int64).to(device)
    size = block_size or block_rows(n, dim, candidates, budget - buffer_bytes, compute_dtype)
    qc = q32.to(compute_dtype)
    if selection == "cuvs":  # never coarse, so no max ‖k‖² is needed
        (coarse_d, best_i), max_norm = brute_force_candidates(q32, keys, own, candidates), None
    elif plan is None:
        coarse_d, best_i, max_norm = _candidates(qc, _host_blocks(keys, size), own, candidates, coarse, key_norms)
    else:
        coarse_d, best_i, max_norm = _threshold_candidates(qc, keys, size, own, candidates, key_norms, plan)
    exact = exact_distances(q32, keys, best_i, budget, fused=plan is not None)
    exact, best_i = by_distance_then_id(exact, best_i)
    dist, ids = exact[:, :k], best_i[:, :k]

    def again(rows, **settings):  # these rows searched again
        redo = exact_search(
            q32[rows], keys, k, None if own is None else own[rows], device, memory_bytes, block_size, **settings
        )
        dist[rows], ids[rows] = redo

    if complete_ties and candidates < available:
        open_rows = (exact[:, -1] == dist[:, -1]).nonzero().squeeze(1)  # the k-th distance's tie fills them all
        if len(open_rows):  # with twice the candidates (all the keys, at the most) by topk: few rows, a pass each
            dtype = None if coarse else compute_dtype
            again(open_rows, compute_dtype=dtype, margin=2 * candidates - k, key_norms=key_norms, selection="topk")
    if coarse and candidates < available:  # rows bf16 cannot vouch for are searched again at full precision
        unsure = ~_certified(q32, dist[:, -1], coarse_d.max(1).values, max_norm)
        if unsure.any():
            again(unsure.nonzero().squeeze(1), margin=margin)
    return dist, ids


def by_distance_then_id(dist: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of (distances, ids) [n, m] sorted by distance, ties by id: the order of every exact result."""
    by_id = ids.argsort(dim=1, stable=True)  # then a stable sort by distance keeps the ids' order among ties
    dist, ids = dist.gather(1, by_id), ids.gather(1, by_id)
    order = dist.argsort(dim=1, stable=True)
    return dist.gather(1, order), ids.gather(1, order)


def _candidates(qc, blocks, own, candidates: int, coarse: bool, key_norms):
    """The running search: (coarse scores [n, c], ids [n, c] of the ``c`` best by score, max ‖k‖² seen)."""
    n, device = qc.shape[0], qc.device
    best_d = torch.full((n, candidates), math.inf, device=device)
    best_i = torch.full((n, candidates), -1, dtype=torch.int64, device=device)
    max_norm = torch.zeros((), device=device)
    for b0, kc, k_norm in _device_blocks(qc, blocks, key_norms):
        max_norm = torch.maximum(max_norm, k_norm.max())
        score = ranking_scores(qc, kc, k_norm, coarse)
        _exclude_own(score, own, b0)
        # one topk over the block's full rows: on an H200 99 ms a 4,096-query call over 2 M keys, a two-stage 163 ms
        top_d, top_i = score.topk(min(candidates, score.shape[1]), dim=1, largest=False, sorted=False)
        merged_d, merged_i = torch.cat([best_d, top_d.float()], 1), torch.cat([best_i, top_i + b0], 1)
        best_d, pick = merged_d.topk(candidates, dim=1, largest=False, sorted=False)
        best_i = merged_i.gather(1, pick)
    return best_d, best_i, max_norm


def _device_blocks(qc, blocks, key_norms):
    """(start, keys in the compute dtype, their fp32 ‖k‖²) of each host or device block, on the queries' device."""
    for b0, block in blocks:
        kc = block.to(qc.device, non_blocking=True).to(qc.dtype)
        exact_keys = kc if kc.dtype == torch.float32 else block.to(qc.device)
        yield b0, kc, squared_norms(exact_keys) if key_norms is None else key_norms[b0 : b0 + len(block)]


def _exclude_own(score: torch.Tensor, own: torch.Tensor | None, b0: int) -> None:
    """The query's own key, wherever it falls in the block starting at ``b0``: +inf, in place (no host sync)."""
    if own is None:
        return
    local = own - b0
    inside = (local >= 0) & (local < score.shape[1])
    col = local.clamp(0, score.shape[1] - 1)[:, None]
    score.scatter_(1, col, torch.where(inside[:, None], math.inf, score.gather(1, col)))


def _threshold_candidates(qc, keys, size: int, own, candidates: int, key_norms, plan: ThresholdPlan):
    """:func:`_candidates` by threshold selection: every key under its query's τ (:func:`sample_thresholds`) goes
    into a buffer, by the fused Triton kernel on a GPU (no score block), else from each block's scores; the
    ``candidates`` best of the buffer, and rows it cannot serve searched again by :func:`_candidates`."""
    tau = sample_thresholds(qc, keys, size, own, key_norms, plan)
    buffers, kernels = candidate_buffers(len(qc), plan.capacity, qc.device), triton_kernels(qc.device)
    for b0, kc, k_norm in _device_blocks(qc, _host_blocks(keys, size), key_norms):
        if kernels is not None and qc.dtype == torch.float16:  # fp16: the dtype the kernel is tested in
            kernels.collect_below_fused(qc, kc, k_norm, tau, own, b0, buffers)
        else:
            score = ranking_scores(qc, kc, k_norm, False)
            _exclude_own(score, own, b0)
            collect_below(score, tau, b0, buffers)
    best_d, best_i = best_in_buffers(buffers, candidates)
    redo = needs_fallback(buffers.counts, candidates, plan.capacity)
    if redo.any():
        rows = redo.nonzero().squeeze(1)
        own_rows = None if own is None else own[rows]
        found = _candidates(qc[rows], _host_blocks(keys, size), own_rows, candidates, False, key_norms)
        best_d[rows], best_i[rows] = found[0], found[1]
    return best_d, best_i, None  # no max ‖k‖²: only coarse search uses it


def sample_thresholds(qc, keys, size: int, own, key_norms, plan: ThresholdPlan) -> torch.Tensor:
    """τ [n]: each query's ``plan.rank``-th best score over every ``plan.stride``-th key (its own key left out), for
    queries ``qc`` in the compute dtype, searched in blocks of ``size`` keys; ``key_norms`` as in exact_search."""
    sample_ids = torch.arange(plan.offset, keys.shape[0], plan.stride)
    tensor = isinstance(keys, torch.Tensor)
    sample = keys[sample_ids.to(keys.device)] if tensor else torch.from_numpy(gather_rows(keys, sample_ids.numpy()))
    norms = None if key_norms is None else key_norms[sample_ids.to(key_norms.device)]
    own_in_sample = None
    if own is not None:  # the own key's index in the sample, or −1 (never inside a block) where it is not sampled
        local = own - plan.offset
        own_in_sample = torch.where(local % plan.stride == 0, local.div(plan.stride, rounding_mode="floor"), -1)
    best, _, _ = _candidates(qc, _host_blocks(sample, size), own_in_sample, plan.rank, False, norms)
    return best.max(1).values


def _certified(q32: torch.Tensor, kth: torch.Tensor, cutoff: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """Per row: whether bf16 scores provably kept the true k nearest. A key left out scored ≥ ``cutoff`` (the worst
    kept score); bf16 rounding of q, k, ‖k‖² and the score moves a score by at most 2^-7 (‖k‖² + 2 ‖q‖ ‖k‖) (2^-8
    each for the product's inputs and the output, fp32 accumulation well inside), so a left-out key's distance is
    ≥ cutoff − error + ‖q‖², and a k-th exact distance at or below that bound leaves nothing closer outside. Twice
    that error is assumed, for safety."""
    q_norm = q32.square().sum(1)
    error = 2.0**-6 * (max_norm + 2 * (q_norm * max_norm).sqrt())
    return kth <= cutoff - error + q_norm
