"""Index planning: which FAISS index a datastore of N keys × d dims gets, and what it will cost, before building.

The rules are FAISS's own constraints made explicit, so a paper-scale store (103 M × 1,600) does not silently get
an index whose training sample is too small for its lists or whose PQ layout a GPU cannot run:

- **Flat** below 200 k keys: exact search, nothing to train.
- **IVF<nlist>,PQ<m>** above: nlist ≈ 4·√N (a power of two); m the largest PQ size ≤ 64 that divides d and is a
  code size the GPU kernels accept; 8-bit codes. Training takes 39–256 keys per list (FAISS warns below 39 and
  ignores more than 256), sampled across the whole store, within the stated memory budget; when even 39 per list
  does not fit, nlist is halved until it does.
- **IVF<nlist>,Flat** instead where the IVF-PQ index would not take at most half its memory: narrow keys (below
  0.35–0.65 M keys at d = 256, 1.5–3 M at d = 128), where PQ's precomputed table (nlist × m × 256 floats) outweighs
  what the codes save; there IVF-Flat measured as small or twice the size, more accurate, faster to search and an
  eighth of the build (benchmarks/pq_size.py, docs/results/index-pq-size.md).

Those numbers are the default :class:`IndexRule`; a caller with other needs (the quickstart: small stores on a
laptop CPU, exact distances within the probed lists) passes its own rule's numbers, not its own rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

FLAT_MAX_ENTRIES = 200_000
MIN_TRAIN_PER_LIST, MAX_TRAIN_PER_LIST = 39, 256
GPU_PQ_SIZES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # code bytes faiss-gpu implements
GPU_MAX_K = 2048
# dims per PQ sub-quantizer faiss-gpu's IVF-PQ scans without precomputed tables (its isSupportedNoPrecomputedSubDimSize)
GPU_NO_PRECOMPUTED_SUBDIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
FLOAT32 = 4
PQ_CENTROIDS = 256  # 8-bit codes, FAISS's default (PQ<m>x<bits> has 2^bits)
PRECOMPUTED_TABLE_MAX_BYTES = 2**31  # faiss's precomputed_table_max_bytes: larger IVF-PQ tables are not built
# the auto plan compresses only where IVF-PQ takes at most this fraction of IVF-Flat's memory: short of it, the codes'
# approximate distances, slower scans and 8× build (docs/results/index-pq-size.md) buy too little
MAX_COMPRESSED_FRACTION = 0.5


@dataclass(frozen=True)
class IndexRule:
    """The sizing rule's numbers: Flat below ``flat_below`` keys; else IVF with 2^round(log2(lists_per_sqrt·√N))
    lists, trained on up to ``train_per_list`` keys per list, over PQ codes (``compress``) or uncompressed keys."""

    flat_below: int = FLAT_MAX_ENTRIES
    lists_per_sqrt: float = 4.0
    train_per_list: int = MAX_TRAIN_PER_LIST
    compress: bool = True

    def __post_init__(self):
        if not MIN_TRAIN_PER_LIST <= self.train_per_list <= MAX_TRAIN_PER_LIST:
            raise ValueError(
                f"train_per_list must be in [{MIN_TRAIN_PER_LIST}, {MAX_TRAIN_PER_LIST}] (FAISS warns below, ignores "
                f"above), got {self.train_per_list}."
            )
        if self.lists_per_sqrt <= 0 or self.flat_below < 0:
            raise ValueError(f"lists_per_sqrt must be positive and flat_below ≥ 0, got {self}.")


@dataclass(frozen=True)
class IndexPlan:
    """A chosen index and its costs (bytes, training sample, float operations per query)."""

    factory: str
    num_entries: int
    dim: int
    nlist: int | None
    pq_m: int | None
    train_size: int
    index_bytes: int
    train_bytes: int
    flops_per_query: float
    notes: list[str] = field(default_factory=list)
    pq_centroids: int | None = None  # per PQ sub-quantizer: 2^bits of PQ<m>x<bits>

    def describe(self) -> str:
        lines = [
            f"index plan for {self.num_entries:,} keys × {self.dim} dims: {self.factory}",
            f"  index size      {self.index_bytes / 2**30:.2f} GiB (RAM, or GPU memory when searched there)",
            f"  training sample {self.train_size:,} keys ({self.train_bytes / 2**30:.2f} GiB float32)"
            + (f", {self.train_size / self.nlist:.0f} per list" if self.nlist else ""),
            f"  search cost     {self.flops_per_query / 1e6:.1f} Mflop per query",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def pq_size(dim: int, gpu: bool = False, max_m: int = 64) -> int:
    """Largest m ≤ max_m dividing d (one sub-vector per code byte), restricted to GPU-legal code sizes if asked."""
    legal = [m for m in range(1, min(max_m, dim) + 1) if dim % m == 0 and (not gpu or m in GPU_PQ_SIZES)]
    if not legal:
        raise ValueError(f"no PQ code size ≤ {max_m} divides d={dim}{' among the GPU sizes' if gpu else ''}.")
    return max(legal)


def plan_index(
    num_entries: int,
    dim: int,
    memory_gb: float = 8.0,
    gpu: bool = False,
    nprobe: int = 32,
    factory: str = "auto",
    rule: IndexRule = IndexRule(),
) -> IndexPlan:
    """The index for ``num_entries`` keys of ``dim`` dims under a ``memory_gb`` budget for the training sample.

    ``factory="auto"`` applies ``rule`` (the default: paper scale, PQ codes); an IVF index's training sample is
    ``rule.train_per_list`` keys per list at most, 39 at least, within the budget.

    ``factory`` other than ``auto`` is kept as given: its IVF list count, if any, sets the training sample; another
    index that FAISS must train (PQ, SQ, OPQ, PCA … without IVF) gets the sample of 256 lists, PQ's 8-bit codebooks.
    """
    if num_entries <= 0 or dim <= 0:
        raise ValueError(f"need a non-empty datastore, got {num_entries} keys × {dim} dims.")
    if factory == "auto" and num_entries < rule.flat_below:
        factory = "Flat"
    if factory == "Flat":
        size = num_entries * dim * FLOAT32
        return IndexPlan("Flat", num_entries, dim, None, None, 0, size, 0, 2.0 * num_entries * dim)
    notes: list[str] = []
    budget = int(memory_gb * 2**30)
    if factory == "auto":
        nlist = 2 ** round(math.log2(rule.lists_per_sqrt * math.sqrt(num_entries)))
        while nlist > 1 and MIN_TRAIN_PER_LIST * nlist * dim * FLOAT32 > budget:
            nlist //= 2
            notes.append(f"nlist halved to {nlist} so that {MIN_TRAIN_PER_LIST} training keys per list fit")
        if rule.compress:
            plan = compressed_lists(nlist, num_entries, dim, budget, gpu, nprobe, rule.train_per_list, notes)
        else:
            plan = costed_plan(f"IVF{nlist},Flat", num_entries, dim, budget, nprobe, rule.train_per_list)
    else:
        plan = costed_plan(factory, num_entries, dim, budget, nprobe, rule.train_per_list)
    return dataclasses.replace(plan, notes=notes + plan.notes)


def compressed_lists(
    nlist: int, num_entries: int, dim: int, budget: int, gpu: bool, nprobe: int, train_per_list: int, notes: list[str]
) -> IndexPlan:
    """The plan of ``IVF<nlist>,PQ<m>`` (m: :func:`pq_size`) where it takes at most :data:`MAX_COMPRESSED_FRACTION`
    of ``IVF<nlist>,Flat``'s memory, else the latter's (narrow keys: PQ's precomputed table outweighs what the codes
    save); why goes to ``notes``, with what a GPU will need."""
    m = pq_size(dim, gpu)
    flat = costed_plan(f"IVF{nlist},Flat", num_entries, dim, budget, nprobe, train_per_list)
    pq = costed_plan(f"IVF{nlist},PQ{m}", num_entries, dim, budget, nprobe, train_per_list)
    if pq.index_bytes > MAX_COMPRESSED_FRACTION * flat.index_bytes:
        notes.append(
            f"IVF-Flat: {pq.factory} would take {pq.index_bytes / 2**30:.2f} GiB with its precomputed table, more "
            f"than {MAX_COMPRESSED_FRACTION:g} of IVF-Flat's {flat.index_bytes / 2**30:.2f} GiB"
        )
        return flat
    precomputed, half = gpu_pq_options(dim, m)
    if gpu and half:
        notes.append("PQ with more than 48 code bytes needs float16 lookup tables on the GPU (useFloat16)")
    if gpu and precomputed:
        notes.append(f"{dim // m} dims per PQ sub-quantizer need precomputed tables on the GPU (usePrecomputed)")
    return pq


def costed_plan(factory: str, num_entries: int, dim: int, budget: int, nprobe: int, train_per_list: int) -> IndexPlan:
    """The costs of an IVF (or other trained) index ``factory``: training sample within ``budget`` bytes, index
    bytes as loaded (codes, ids, centroids, IVF-PQ's precomputed table), float operations per query."""
    notes: list[str] = []
    found = re.search(r"IVF(\d+)", factory)  # anywhere: OPQ16,IVF64,PQ16 has 64 lists
    nlist = int(found.group(1)) if found else None
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    m = int(pq.group(1)) if pq else None
    bits = int(pq.group(2)) if pq and pq.group(2) else 8
    centroids = 2**bits if m else None
    train = 0
    trained = nlist is None and needs_training(dim, factory)  # PQ, SQ, OPQ, PCA …: a codebook's or PQ's sample
    clusters = nlist if nlist is not None else (centroids or PQ_CENTROIDS) if trained else None
    if clusters is not None:
        fits = max(MIN_TRAIN_PER_LIST * clusters, budget // (dim * FLOAT32))
        train = min(num_entries, train_per_list * clusters, fits)
        if nlist is not None and train < MIN_TRAIN_PER_LIST * nlist:
            notes.append(f"only {train} training keys for {nlist} lists (FAISS wants ≥ {MIN_TRAIN_PER_LIST} each)")
    code = math.ceil(m * bits / 8) if m is not None else dim * FLOAT32
    index_bytes = num_entries * (code + 8) + (nlist or 0) * dim * FLOAT32 + (centroids or 0) * dim * FLOAT32
    table = precomputed_table_bytes(nlist, m, centroids or PQ_CENTROIDS)
    if table:
        notes.append(f"{table / 2**30:.2f} GiB of the index size is IVF-PQ's precomputed table, built when loaded")
    index_bytes += table
    per_list = num_entries / nlist if nlist else num_entries
    flops = 2.0 * (nlist or 0) * dim + min(nprobe, nlist or 1) * per_list * (m or 2 * dim)
    return IndexPlan(factory, num_entries, dim, nlist, m, train, index_bytes, train * dim * FLOAT32, flops, notes,
                     centroids)  # fmt: skip


def needs_training(dim: int, factory: str) -> bool:
    """Whether FAISS must train the index ``factory`` describes before keys are added (asked of FAISS itself, on an
    empty index); an invalid string is left to the build's own check, which names it."""
    import faiss

    try:
        return not faiss.index_factory(dim, factory, faiss.METRIC_L2).is_trained
    except RuntimeError:
        return False


def precomputed_table_bytes(nlist: int | None, m: int | None, centroids: int = PQ_CENTROIDS) -> int:
    """The table an IVF-PQ index (L2, by residual) precomputes when loaded or trained: nlist × m × centroids floats,
    held in RAM (or on the GPU) beside the codes; faiss skips it above :data:`PRECOMPUTED_TABLE_MAX_BYTES`."""
    if not nlist or not m:
        return 0
    size = nlist * m * centroids * FLOAT32
    return size if size <= PRECOMPUTED_TABLE_MAX_BYTES else 0


def gpu_pq_options(dim: int, m: int | None) -> tuple[bool, bool]:
    """(usePrecomputed, useFloat16) an IVF-PQ of ``m`` code bytes over ``dim`` dims needs when cloned to faiss-gpu:
    precomputed tables when d/m is not a sub-dimension its kernels scan without them (the paper's 1600/64 = 25 is
    not: faiss-gpu would refuse the index), float16 lookup tables above 48 code bytes (shared memory)."""
    if not m:
        return False, False
    return dim // m not in GPU_NO_PRECOMPUTED_SUBDIMS, m > 48


def check_gpu_k(k: int, self_match: bool = False) -> None:
    """faiss-gpu returns at most 2,048 neighbours: refuse a larger k before any work, naming what fits (one fewer
    when the query's own entry is searched for and dropped)."""
    searched = k + (1 if self_match else 0)
    if searched > GPU_MAX_K:
        extra = " (+ 1 for the query's own entry, searched for and dropped)" if self_match else ""
        raise ValueError(
            f"k={k}{extra} exceeds faiss-gpu's limit of {GPU_MAX_K} neighbours; use k ≤ {GPU_MAX_K - searched + k}, "
            "search on the CPU (--search.use_gpu false), or the exact backend (build-targets --search.backend exact), "
            "which has no such limit."
        )
