"""Benchmark: the pipeline at GPU scale, each stage through the package's own code, on one accelerator.

Run: ``python benchmarks/gpu.py --workdir DIR`` (defaults sized for one H100, ≤ 8 minutes), or ``--tiny true`` for a
minute-long CPU run that keeps the script working in CI. Random-init weights and random-token text: throughput
depends on shapes, not on what the model knows.

1. **datastore**: a GPT-2-small-architecture base (124 M parameters) over ``--tokens`` tokens, weights and forward in
   bf16 (``build_datastore(precision="bf16")``): entries/s.
2. **exact targets**: ``build_targets(search="exact")`` for the positions of a second, smaller corpus against that
   datastore (k = ``--k``, exact squared L2 from bf16 matrix products, top-k merged on the device): queries/s; then
   the search alone on resident keys (fp32-ranked and ``coarse`` bf16 scores, the key upload timed apart), and the
   same search on the host cores (FAISS ``Flat`` when faiss is installed) for scale; where cuVS is installed
   (``pip install -e ".[gpu]"``), the targets again from an IVF-PQ index cuVS builds and searches on the GPU.
3. **fit**: ``train.fit`` of a GPT-2-small decoder on those targets in bf16-mixed: tokens/s of steady-state training
   (timed inside one run by ``TrainingThroughput``, after its warm-up steps) and model FLOPs utilisation
   ((6N + 12·L·T·d) × tokens/s ÷ the card's dense bf16 peak); on a GPU with ``torch.compile``, fused AdamW and the
   vocabulary padded to 64 (``--fast_fit false``: without). Before it, the loss alone on logits of fit's shape with
   each loss kernel (``chunked``, ``rows``); fit uses the faster where their gradients agree.
4. **generation**: greedy decoding with a GPT2-large-shaped base (774 M) alone and + the GPT-2-small decoder, each
   through ``inference.static_generation.StaticGenerator`` (static KV caches, the per-token step compiled, CUDA
   graphs on a GPU: the headline, MemDec against the base through the same generator) and through ``generate()``
   eagerly (``generate_*_eager_ms_per_token``, ``memdec_eager_to_static_speedup``); and + kNN-LM
   (``KNNLM.generate_greedy`` over a datastore keyed by that base, FAISS ``Flat`` on the host cores, and
   ``search="exact"``: the keys resident on the accelerator, searched by matrix products; with cuVS, also an IVF-PQ
   index on the GPU) against its own cached loop without retrieval (paper: 1.28×, 2.17×); the headline uses the
   fastest kNN-LM search. Then kNN-LM's retrieval for one token at ``--scale_sizes`` entries (0.5 M, 5 M, 50 M:
   the real store, then synthetic keys around its real ones): exact over resident keys, and cuVS IVF-PQ with cuVS.
   Last, beam search (4 beams) of base + MemDec: StaticGenerator's compiled step (its caches reordered in place
   inside it) beside ``generate()``'s eager beam search; and a served batch (8 left-padded prompts, greedy, as
   ``memdec serve --decoding static`` runs it) beside eager ``generate()``; each with whether the tokens agree.

They run in the order 1, 2, 4, 3, then the retrieval at scale, beam search and the served batch: fit, whose compilations
make it the likeliest to meet ``--time_limit_s``, after generation. Each stage also prints its roofline:
``<stage>_bound`` (the rate the card's assumed peak allows: dense bf16 FLOP/s for products, HBM bytes/s for batch-1
decoding, printed as ``peak_flops``/``peak_bytes_per_s``) and ``<stage>_roofline_fraction`` (measured ÷ bound). Fixed
costs (key upload, trainer start-up) are printed apart from the rates. The last four lines, in this order, are the
headline: ``exact_targets_qps``, ``fit_mfu``, ``memdec_ms_per_token``, ``memdec_generation_overhead`` (nan where a stage
failed). A section that fails prints ``<section>_error: …`` and the rest still run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import signal
import time
import traceback
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from common import report, timed  # benchmarks/ is the script's directory, first on sys.path
from jsonargparse import CLI
from latency_stores import save_gpt2
from selection_designs import threshold_select, two_stage_select

from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows

# dense bf16 tensor-core peak (no sparsity) and HBM bandwidth, SXM parts: the rooflines' assumed peaks
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# for a device not in the tables (the CPU of a --tiny run): nominal figures, printed as assumed
FALLBACK_PEAKS = (1e12, 1e11)
HEADLINE = ("exact_targets_qps", "fit_mfu", "memdec_ms_per_token", "memdec_generation_overhead")
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12}
GPT2_LARGE = {"n_embd": 1280, "n_layer": 36, "n_head": 20}
TINY = {"n_embd": 64, "n_layer": 2, "n_head": 2}


@exclusive_output
def random_corpus(out: Path, num_tokens: int, seed: int, document: int = 1000) -> Path:
    """Random GPT-2 token ids in documents of ``document`` tokens (the last one EOS), as a corpus directory."""
    from lightning_memdec.io.artifact_dirs import start_work_dir
    from lightning_memdec.io.embedded import load_tokenizer
    from lightning_memdec.io.token_corpus import write_corpus
    from lightning_memdec.io.tokenizer_identity import tokenizer_info

    if (out / "meta.json").is_file():
        return out
    tok = load_tokenizer("gpt2")
    rng = np.random.default_rng(seed)
    docs = [
        rng.integers(0, tok.eos_token_id, size=min(document, num_tokens - s)) for s in range(0, num_tokens, document)
    ]
    for d in docs:
        d[-1] = tok.eos_token_id
    work = start_work_dir(out, {"random_tokens": num_tokens, "seed": seed}, overwrite=True)
    return write_corpus(work, out, docs, tokenizer_info(tok, "gpt2"), sources=[f"random:{seed}"])


@dataclass
class Card:
    """What the rooflines assume of this device, and the headline figures the stages fill in."""

    peak_flops: float
    peak_bytes_per_s: float
    headline: dict = field(default_factory=lambda: dict.fromkeys(HEADLINE, float("nan")))

    @classmethod
    def this_device(cls) -> Card:
        name = device_name()
        flops = next((v for card, v in PEAK_BF16_FLOPS.items() if card in name), None)
        bandwidth = next((v for card, v in PEAK_BYTES_PER_S.items() if card in name), None)
        if flops is None or bandwidth is None:
            report("peak_source", "assumed (device not in the tables)")
            flops, bandwidth = FALLBACK_PEAKS
        report("peak_flops", flops)
        report("peak_bytes_per_s", bandwidth)
        return cls(flops, bandwidth)


def roofline(stage: str, rate: float, bound: float) -> float:
    """Print a stage's bound and the fraction of it measured; return the fraction."""
    report(f"{stage}_bound", bound)
    report(f"{stage}_roofline_fraction", rate / bound)
    return rate / bound


class TimeLimitReached(BaseException):
    """Raised by SIGALRM in whatever stage is running when ``--time_limit_s`` is up. A BaseException, as
    KeyboardInterrupt is: library code's ``except Exception`` (a tokenizer probe, say) must not swallow it."""


def start_time_limit(seconds: float | None) -> None:
    """Stop at ``seconds`` so the headline still prints inside a device's time; the command's own ``timeout`` would
    kill the run before its last lines."""
    if seconds is None:
        return

    def expire(*_):
        expire.fired = True
        raise TimeLimitReached(expire.message)

    expire.fired, expire.message = False, f"the time limit of {seconds:g} s was reached"
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def check_time_limit() -> None:
    """Raise if the limit has passed: its exception may have been lost where the signal landed (a finalizer's
    exceptions are only printed), and then the next stage must not start."""
    expire = signal.getsignal(signal.SIGALRM)
    if getattr(expire, "fired", False):
        raise TimeLimitReached(expire.message)


# in run order, by what a device call lent for minutes should measure first: fit's compiled steady state (its goal)
# has never been measured; generation's headline was (2026-12-04), and its compilations are the slowest stage
STAGES = ("datastore", "targets", "fit", "generation", "search_scale", "beam", "served_batch")
# the fused kernel's launches compared, as kernels.threshold_select_triton.Launch(tiles, warps, stages, append); the
# first is the library's default, the last its other way of appending a tile's hits
TILE_CONFIGS = (
    ((128, 128, 64), 8, 3, "scan"),
    ((128, 256, 64), 8, 3, "scan"),  # 85 FLOP a byte of L2 where 128 x 128 tiles have 64 (d = 768)
    ((256, 128, 64), 8, 3, "scan"),
    ((128, 128, 64), 4, 4, "scan"),
    ((64, 128, 64), 4, 4, "scan"),
    ((128, 64, 64), 4, 3, "scan"),
    ((128, 128, 64), 8, 3, "atomic"),
)


def section(name: str, fn, *args, skipped: tuple[str, ...] = ()):
    """Run one stage; its wall time (compilations, loads and all) is printed as ``<name>_stage_s`` so the next
    device run can be planned, and a failure is reported instead of ending the run."""
    check_time_limit()
    if name in skipped:
        report(f"{name}_skipped", "--skip")
        return None
    start = time.perf_counter()
    try:
        return fn(*args)
    except TimeLimitReached:
        raise  # through every nested section, to main
    except Exception as err:  # report and go on: one broken stage should not hide the others' numbers
        traceback.print_exc()
        report(f"{name}_error", f"{type(err).__name__}: {err}".replace("\n", " ")[:300])
        return None
    finally:
        report(f"{name}_stage_s", time.perf_counter() - start)


def datastore_stage(card: Card, w: Path, shape: dict, tokens: int, window: int, accelerator: str):
    from lightning_memdec.stages.datastore import build_datastore

    base = save_gpt2(w / "gpt2-small-base", **shape, seed=0)
    corpus = random_corpus(w / "corpus-keys", tokens, seed=0)
    out = w / "ds-keys"
    _, seconds = timed(
        lambda: build_datastore(
            corpus,
            str(base),
            out,
            precision="bf16",
            overwrite=True,
            windows=Windows(window=window, stride=window // 2, batch_size=32),
            hardware=Hardware(accelerator=accelerator),
        )
    )
    report("datastore_entries", tokens - 1)
    report("datastore_entries_per_s", (tokens - 1) / seconds)
    from lightning_memdec.training.throughput import forward_flops_per_token, model_params

    flops = forward_flops_per_token(model_params(load_decoder(base)), shape["n_layer"], window, shape["n_embd"])
    roofline("datastore_entries_per_s", (tokens - 1) / seconds, card.peak_flops / flops)
    return base, out


def targets_stage(card: Card, w: Path, base: Path, store: Path, queries: int, window: int, k: int, accelerator: str):
    from lightning_memdec.stages.datastore import build_datastore
    from lightning_memdec.stages.targets import build_targets

    corpus = random_corpus(w / "corpus-queries", queries, seed=1)
    qstore = build_datastore(
        corpus,
        str(base),
        w / "ds-queries",
        precision="bf16",
        overwrite=True,
        windows=Windows(window=window, stride=window // 2, batch_size=32),
        hardware=Hardware(accelerator=accelerator),
    )
    out = w / "targets"
    _, seconds = timed(
        lambda: build_targets(
            store,
            None,
            out,
            queries=qstore,
            overwrite=True,
            knn=KNNTargets(k=k, temperature=16.0),
            search=TargetSearch(backend="exact", selection="topk"),  # a GPU's default (auto), on the CPU too
            hardware=Hardware(accelerator=accelerator),
        )
    )
    report("targets_queries", queries - 1)
    report("targets_k", k)
    rate = (queries - 1) / seconds
    report("targets_exact_queries_per_s", rate)
    keys = Datastore(store).keys
    bound = card.peak_flops / (2 * keys.shape[0] * keys.shape[1])  # 2·N·d FLOPs a query
    roofline("targets_exact_queries_per_s", rate, bound)
    card.headline["exact_targets_qps"] = rate
    section("targets_threshold", selection_targets_rate, "threshold", store, qstore, out, k, accelerator)
    section("search", search_rates, store, qstore, k, bound)
    host_search_rate(store, qstore, k)
    if cuvs_usable():  # cuVS's brute force choosing exact search's candidates, then its IVF-PQ
        section("targets_cuvs_exact", selection_targets_rate, "cuvs", store, qstore, out, k, accelerator)
        section("cuvs_targets", cuvs_targets_rate, w, store, qstore, k, accelerator)
    return corpus, out


def selection_targets_rate(
    selection: str, store: Path, qstore: Path, topk_targets: Path, k: int, accelerator: str
) -> None:
    """The same targets with ``--search.selection <selection>``: queries/s, and whether the stored rows equal the
    topk selection's (their bytes; else how many stored entries differ)."""
    from lightning_memdec.stages.targets import build_targets

    out, seconds = timed(
        lambda: build_targets(
            store,
            None,
            topk_targets.with_name(f"targets-{selection}"),
            queries=qstore,
            overwrite=True,
            knn=KNNTargets(k=k, temperature=16.0),
            search=TargetSearch(backend="exact", selection=selection),
            hardware=Hardware(accelerator=accelerator),
        )
    )
    report(f"targets_exact_{selection}_queries_per_s", len(Datastore(qstore)) / seconds)
    got, want = Targets(out), Targets(topk_targets)
    same = np.array_equal(got.offsets, want.offsets)
    differ = int((got.ids != want.ids).sum() + (got.probs != want.probs).sum()) if same else -1
    report(f"targets_{selection}_entries_differing_from_topk", differ)  # −1: the rows' lengths differ


@cache
def cuvs_usable() -> bool:
    """cuVS importable with its libraries (``pip install -e ".[gpu]"``, or carried: docs/gpu.md) and a GPU to run it
    on; else its rows are left out. Why not, printed once as ``cuvs_import_error``."""
    if importlib.util.find_spec("cuvs") is None or not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("cuvs.neighbors.ivf_pq")  # loads libcuvs and the CUDA libraries it links
    except Exception as err:  # an import error, or a library the loader could not find: the other rows go on
        report("cuvs_import_error", f"{type(err).__name__}: {err}".replace("\n", " ")[:300])
        return False
    return True


def cuvs_targets_rate(w: Path, store: Path, qstore: Path, k: int, accelerator: str) -> None:
    """The same targets from an IVF-PQ index that cuVS builds and searches on the GPU (the plan ``auto`` gives for
    this store): build seconds, its recall@64 against exact search, and queries/s of ``build_targets`` with it."""
    from lightning_memdec.io.artifact_dirs import read_meta
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.targets import build_targets

    index, seconds = timed(lambda: build_index(store, w / "index-cuvs", overwrite=True, library="cuvs"))
    meta = read_meta(index, kind="index")
    report("cuvs_index_factory", meta["factory"])
    report("cuvs_index_build_s", seconds)
    report("cuvs_index_recall_at_64", meta["recall"]["recall"])
    _, seconds = timed(
        lambda: build_targets(
            store,
            index,
            w / "targets-cuvs",
            queries=qstore,
            overwrite=True,
            knn=KNNTargets(k=k, temperature=16.0),
            search=TargetSearch(backend="faiss"),
            hardware=Hardware(accelerator=accelerator),
        )
    )
    report("targets_cuvs_ivfpq_queries_per_s", len(Datastore(qstore)) / seconds)


def search_rates(store_dir: Path, qstore_dir: Path, k: int, bound: float, n: int = 4096) -> None:
    """The search alone on resident keys (no Trainer, no target rows, no merge), fp32-ranked and bf16-coarse, with
    the fixed cost of putting the keys and their norms on the device printed apart."""
    from lightning_memdec.retrieval.exact_search import exact_search, resident_keys, squared_norms

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store, qstore = Datastore(store_dir), Datastore(qstore_dir)
    (keys, norms), upload = timed(lambda: (lambda r: (r, squared_norms(r)))(resident_keys(store.keys, dev, 1 << 62)))
    report("search_key_upload_s", upload)
    queries = torch.from_numpy(np.asarray(qstore.keys[:n], dtype=np.float32)).to(dev)
    found = {}
    selections = {"exact_search": {"selection": "topk"}, "exact_search_coarse": {"coarse": True},
                  "exact_search_threshold": {"selection": "threshold"}}  # fmt: skip
    if cuvs_usable():
        selections["exact_search_cuvs"] = {"selection": "cuvs"}
    for name, options in selections.items():
        search = lambda options=options: exact_search(queries, keys, k, device=dev, key_norms=norms, **options)
        search()  # warm-up
        found[name], seconds = timed(search)
        report(f"{name}_queries_per_s", len(queries) / seconds)
        roofline(f"{name}_queries_per_s", len(queries) / seconds, bound)
    for name in [name for name in ("threshold", "cuvs") if f"exact_search_{name}" in found]:
        same = (found[f"exact_search_{name}"][1] == found["exact_search"][1]).all(1).float().mean().item()
        report(f"exact_search_{name}_rows_equal_topk", same)
    section("search_breakdown", search_breakdown, keys, norms, queries, k)
    section("threshold_breakdown", threshold_breakdown, keys, norms, queries, k)
    neighbours = found["exact_search"]
    section("rows_breakdown", rows_breakdown, store, neighbours)


def rows_breakdown(store: Datastore, neighbours: tuple[torch.Tensor, torch.Tensor]) -> None:
    """What build_targets does with one chunk's neighbours after the search, ms each, side by side: the sparse rows
    built where the neighbours are (the torch kernel, host copy of the rows included) then rounded to the stored fp16
    form on the host (``stored_rows``, numpy: what build_targets did until 2026-12-04), and the stored form made on
    the device (``stored=True``, what it does now)."""
    from lightning_memdec.kernels.sparse_targets import stored_rows
    from lightning_memdec.kernels.sparse_targets_torch import knn_distributions_torch
    from lightning_memdec.stages.target_searcher import values_on

    dist, ids = neighbours
    tokens = values_on(store.values, dist.device)[ids.clamp(min=0)]
    rows = lambda: knn_distributions_torch(dist, tokens, 16.0)
    rows()
    found, seconds = timed(rows)
    report("targets_rows_ms", 1000 * seconds)
    want, seconds = timed(lambda: stored_rows(*found))
    report("targets_stored_rows_ms", 1000 * seconds)
    stored = lambda: knn_distributions_torch(dist, tokens, 16.0, stored=True)
    stored()
    got, seconds = timed(stored)
    report("targets_rows_stored_on_device_ms", 1000 * seconds)
    report("targets_rows_stored_on_device_equal", int(all(np.array_equal(g, w) for g, w in zip(got, want))))


def search_breakdown(keys: torch.Tensor, norms: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    """Where exact search's time goes, per call of ``len(queries)`` queries over all keys, side by side: the score
    products alone (``ranking_scores`` a block, as exact_search writes them; beside them plain products without
    the ‖k‖² term, written in fp32, fp16 and bf16, which the library does not use), the selection it uses (one
    ``topk``) beside two designs (benchmarks/selection_designs.py), and the fp32 re-ranking; at the library's block
    size and at 1/8."""
    from lightning_memdec.retrieval.exact_search import exact_distances, ranking_scores
    from lightning_memdec.retrieval.search_budget import memory_budget

    dev, n = keys.device, len(queries)
    dtype, m, qc, full = search_call(keys, queries, k)
    fp32_out = {"out_dtype": torch.float32} if dtype != torch.float32 and dev.type == "cuda" else {}

    for label, size in (("", full), ("_eighth_block", max(1, full // 8))):
        block_times(label, partial(block_scores, qc, keys, norms, size), size, len(keys), m)
    ids = torch.randint(0, len(keys), (n, m), device=dev)
    for name, fused in (("", False), ("_fused", True)):  # torch's gather, subtract, square, sum; the Triton kernel
        exact_distances(queries, keys, ids, memory_budget(dev), fused)
        _, seconds = timed(lambda fused=fused: exact_distances(queries, keys, ids, memory_budget(dev), fused))
        report(f"search_rerank{name}_ms", 1000 * seconds)
    # last (an older torch may lack mm's out_dtype): plain products, no ‖k‖² added: fp32 output (the bias's
    # share of the addmm), then written in the inputs' dtype
    for name, low, out in (("fp32_out_no_bias", dtype, fp32_out), ("fp16_out", torch.float16, {}),
                           ("bf16_out", torch.bfloat16, {})):  # fmt: skip
        if dev.type == "cuda":
            plain = lambda b0, low=low, out=out: torch.mm(qc.to(low), keys[b0 : b0 + full].to(low).T, **out)
            block_times(f"_{name}", plain, full, len(keys), m, select=False)
    # ‖k‖² folded into the product (two more key columns, its high and low parts): no bias pass, if that is its cost
    folded_q, folded_keys = folded_norms(qc, keys, norms)
    folded = lambda b0: torch.mm(folded_q, folded_keys[b0 : b0 + full].T, **fp32_out)
    block_times("_folded_norms", folded, full, len(keys), m, select=False)
    # checked on 64 queries × 65,536 keys: a whole block's scores are 4,096 × ~2 M fp32 (33 GB), too many to compare
    rows, cols = slice(0, 64), slice(0, min(full, 1 << 16))
    want = ranking_scores(qc[rows], keys[cols].to(dtype), norms[cols], coarse=False)
    got = torch.mm(folded_q[rows], folded_keys[cols].T, **fp32_out)
    report("search_folded_norms_max_diff_over_max", float((got - want).abs().max() / want.abs().max()))


def folded_norms(qc: torch.Tensor, keys: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q' [n, w], k' [N, w]) in ``qc``'s dtype with q'·k'ᵀ = ‖k‖² − 2 q·k in one product: q' = [−2q, s, s, 0…],
    k' = [k, hi, lo, 0…], where hi + lo = ‖k‖²/s (hi rounded to the dtype, lo the rest rounded again: about twice
    its bits) and s a power of two keeping ‖k‖²/s within fp16's range; w = d + 2 rounded up to a multiple of 8."""
    n, d = qc.shape
    width = -(-(d + 2) // 8) * 8
    scale = 2.0 ** math.ceil(math.log2(max(float(norms.max()), 1e-30) / 2**14))
    q = torch.zeros(n, width, dtype=qc.dtype, device=qc.device)
    q[:, :d], q[:, d : d + 2] = -2 * qc, scale
    k = torch.zeros(len(keys), width, dtype=qc.dtype, device=keys.device)
    k[:, :d] = keys
    hi = (norms / scale).to(qc.dtype)
    k[:, d], k[:, d + 1] = hi, (norms / scale - hi.float()).to(qc.dtype)
    return q, k


def search_call(keys: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.dtype, int, torch.Tensor, int]:
    """What exact_search picks for one call on the keys' device: (compute dtype, candidates k + margin, the queries
    in that dtype, keys per block)."""
    from lightning_memdec.retrieval.exact_search import default_compute_dtype
    from lightning_memdec.retrieval.search_budget import block_rows, memory_budget, rerank_margin

    dev = keys.device
    dtype = default_compute_dtype(dev)
    m = k + rerank_margin(k, dtype)
    return dtype, m, queries.to(dtype), block_rows(len(queries), keys.shape[1], m, memory_budget(dev), dtype)


def block_scores(qc: torch.Tensor, keys: torch.Tensor, norms: torch.Tensor, size: int, b0: int) -> torch.Tensor:
    """What exact_search writes for the block of ``size`` keys from ``b0``: the ranking scores of the queries ``qc``
    (in the compute dtype, as :func:`search_call` gives them)."""
    from lightning_memdec.retrieval.exact_search import ranking_scores

    return ranking_scores(qc, keys[b0 : b0 + size].to(qc.dtype), norms[b0 : b0 + size], coarse=False)


def threshold_breakdown(keys: torch.Tensor, norms: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    """The threshold selection's parts, per call of ``len(queries)`` queries, ms each: τ from the sample, then every
    key under it collected in one call over all keys (the fused Triton kernel, at each launch in ``TILE_CONFIGS``;
    without Triton, the torch path a block at a time), the buffer's top-k, and how well τ held (mean keys under
    it, rows searched again)."""
    from lightning_memdec.kernels.threshold_select import (
        best_in_buffers,
        candidate_buffers,
        collect_below,
        needs_fallback,
        threshold_plan,
        triton_kernels,
    )
    from lightning_memdec.retrieval.exact_search import sample_thresholds

    dev, n = keys.device, len(queries)
    dtype, m, qc, size = search_call(keys, queries, k)
    plan = threshold_plan(len(keys), m)
    if plan is None:
        report("threshold_plan", "none: a store this small is searched by topk")
        return
    report("threshold_stride", plan.stride)
    report("threshold_capacity", plan.capacity)
    sample = lambda: sample_thresholds(qc, keys, size, None, norms, plan)
    sample()
    tau, seconds = timed(sample)
    report("threshold_sample_ms", 1000 * seconds)
    kernels = triton_kernels(dev)

    def torch_collect(buffers):  # no Triton: each block's scores, then the keys under τ
        for b0 in range(0, len(keys), size):
            score = block_scores(qc, keys, norms, size, b0)
            collect_below(score, tau, b0, buffers)

    launches = {"torch": torch_collect}
    if kernels is not None and dtype == torch.float16:
        launches = {
            "_".join(map(str, launch.tiles + (launch.num_warps, launch.num_stages)))
            + ("_atomic" if launch.append == "atomic" else ""): partial(
                kernels.collect_below_fused, qc, keys, norms, tau, None, 0, launch=launch
            )
            for launch in (kernels.Launch(*config) for config in TILE_CONFIGS)
        }
    buffers = None
    for name, collect in launches.items():
        try:
            collect(candidate_buffers(n, plan.capacity, dev))  # compiles
            buffers = candidate_buffers(n, plan.capacity, dev)
            _, seconds = timed(partial(collect, buffers))
            report(f"threshold_collect_{name}_ms", 1000 * seconds)
        except Exception as err:  # a launch this card cannot run (its shared memory, say): the others still measured
            report(f"threshold_collect_{name}_error", f"{type(err).__name__}: {err}".replace("\n", " ")[:200])
    if buffers is None:
        return
    report("threshold_mean_keys_under_tau", buffers.counts.float().mean().item())
    report("threshold_rows_searched_again", int(needs_fallback(buffers.counts, m, plan.capacity).sum()))
    _, seconds = timed(lambda: buffers.scores.topk(m, dim=1, largest=False, sorted=False))
    report("threshold_buffer_topk_ms", 1000 * seconds)  # the plain float topk, beside what the library does:
    _, seconds = timed(lambda: best_in_buffers(buffers, m))  # ties by id, whatever order the kernel filled slots in
    report("threshold_buffer_best_ms", 1000 * seconds)


def block_times(label: str, scores, size: int, num_keys: int, m: int, select: bool = True) -> None:
    """search_breakdown's rows for one block size: all products, then (``select``) each selection of one block scaled
    to the whole store."""
    starts = range(0, num_keys, size)
    report(f"search{label}_block_keys", min(size, num_keys))

    def products_only():
        for b0 in starts:
            scores(b0)  # each block's scores freed as the next is written, as in exact_search

    products_only()  # warm-up
    _, products = timed(products_only)
    report(f"search{label}_products_ms", 1000 * products)
    if not select:
        return
    score = scores(0)
    scale = num_keys / score.shape[1]  # one block's selection time, scaled to the whole store
    selections = {
        "two_stage": lambda: two_stage_select(score, m),
        "one_stage": lambda: score.topk(m, dim=1, largest=False, sorted=False),
        "threshold": lambda: threshold_select(score, m),
    }
    ref = score.topk(m, dim=1, largest=False).values  # sorted: what every selection must keep
    for name, choose in selections.items():
        choose()
        picked, seconds = timed(choose)
        report(f"search{label}_select_{name}_ms", 1000 * seconds * scale)
        if name != "one_stage":  # the reference itself
            report(f"search{label}_select_{name}_equal", int(torch.equal(picked[0].sort(1).values, ref)))


def host_search_rate(store_dir: Path, qstore_dir: Path, k: int, n: int = 256) -> None:
    """The same exact search on the host cores, on the first ``n`` queries: FAISS Flat when installed."""
    store, qstore = Datastore(store_dir), Datastore(qstore_dir)
    queries = np.asarray(qstore.keys[:n], dtype=np.float32)
    try:
        import faiss
    except ImportError:
        report("host_faiss", "not installed")
        return
    keys = np.asarray(store.keys, dtype=np.float32)
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    _, seconds = timed(lambda: index.search(queries, k))
    report("host_faiss_flat_threads", faiss.omp_get_max_threads())
    report("host_faiss_flat_queries_per_s", n / seconds)


def fit_stage(card: Card, w: Path, shape: dict, corpus: Path, targets: Path, window: int, steps: int, batch: int,
              k: int, accelerator: str, fast: bool):  # fmt: skip
    """``fast``: the speed options (torch.compile, fused AdamW, vocabulary padded to 64; on by default on a GPU)."""
    from lightning_memdec.io.packaged_configs import load_config
    from lightning_memdec.training.fit import fit
    from lightning_memdec.training.throughput import TrainingThroughput

    pad_multiple = 64 if fast else 1
    kernel = section("fit_loss_kernels", loss_kernels, batch, window, k, pad_multiple, accelerator) or "chunked"
    config = load_config(
        {
            "model": {"config": {"model_type": "gpt2", "vocab_size": 50257, "n_positions": window, **shape},
                      "compile": fast, "fused_adamw": fast, "pad_vocab_multiple": pad_multiple,
                      "loss_kernel": kernel},
            "data": {"train_corpus": str(corpus), "train_targets": str(targets), "window": window,
                     "batch_size": batch, "num_workers": 4, "pad_last_batch": fast},
            "trainer": {"accelerator": accelerator, "devices": 1, "precision": "bf16-mixed", "max_steps": steps,
                        "limit_val_batches": 0, "enable_progress_bar": False,
                        },
        }
    )  # fmt: skip

    # one run, timed inside by the callback: the steps after the warm-up (compilation, allocator, loader start) at
    # the steady state, with no Trainer set-up or export in the span
    meter = TrainingThroughput(warmup_steps=max(1, min(10, steps // 3)), peak_flops=card.peak_flops)
    cfg = dict(config, trainer={**config["trainer"], "default_root_dir": str(w / "fit")})
    # no checkpoints: with a split of a few batches, the default one per epoch (1.5 GB with AdamW's state) would be
    # timed instead of training
    cfg.update(export={"dirpath": str(w / "fit" / "hf")}, checkpoint={"save_top_k": 0, "save_last": False})
    export = fit(cfg, callbacks=[meter])
    params = sum(p.numel() for p in load_decoder(export).parameters())
    report("fit_decoder_params", params)
    report("fit_timed_steps", steps - meter.warmup_steps)
    report("fit_tokens_per_s", meter.tokens_per_s)
    report("fit_options", f"compile={fast} fused_adamw={fast} pad_vocab_multiple={pad_multiple} loss_kernel={kernel}")
    # the meter's own model FLOPs a token (the padded vocabulary's rows left out): fit_mfu is the train/mfu logged
    card.headline["fit_mfu"] = roofline("fit_tokens_per_s", meter.tokens_per_s, card.peak_flops / meter.flops_per_token)
    section("fit_breakdown", fit_breakdown, config, accelerator)


def loss_kernels(batch: int, window: int, support: int, pad_multiple: int, accelerator: str, steps: int = 10) -> str:
    """The Memory Decoder loss alone, forward and backward, on bf16 logits shaped as fit's decoder gives them (a
    padded vocabulary, ``vocab_size`` telling its columns) with ``support`` distinct target ids a position (a quarter
    to all of them kept): the chunked kernel beside the row passes. Returns the faster where the two agree, else
    ``chunked``."""
    from lightning_memdec.kernels.memdec_loss import memdec_loss

    dev = "cuda" if accelerator == "gpu" else "cpu"
    vocab, n = 50257, batch * window
    padded = -(-vocab // pad_multiple) * pad_multiple
    g = torch.Generator(device=dev).manual_seed(0)
    wide = (2 * torch.randn(batch, window, padded, generator=g, device=dev)).bfloat16().requires_grad_(True)
    ids = torch.rand(n, vocab, generator=g, device=dev).topk(support, dim=1).indices  # distinct a row
    kept = torch.arange(support, device=dev) < torch.randint(support // 4, support + 1, (n, 1), generator=g, device=dev)
    probs = torch.rand(n, support, generator=g, device=dev).pow(4) * kept
    probs = (probs / probs.sum(1, keepdim=True)).view(batch, window, support)
    ids = ids.masked_fill(~kept, 0).view(batch, window, support)
    labels = torch.randint(0, vocab, (batch, window), generator=g, device=dev)

    def loss_and_grad(kernel: str):
        wide.grad = None
        loss = memdec_loss(wide, labels, ids, probs, kernel=kernel, vocab_size=vocab).loss  # as the module calls it
        loss.backward()
        return loss.detach(), wide.grad

    results, ms = {}, {}
    for kernel in ("chunked", "rows"):
        loss, grad = loss_and_grad(kernel)  # warm-up (Triton's compilation), and the values compared
        results[kernel] = (loss, grad.float())
        _, seconds = timed(lambda kernel=kernel: [loss_and_grad(kernel) for _ in range(steps)])
        ms[kernel] = 1000 * seconds / steps
        report(f"loss_{kernel}_ms", ms[kernel])
    (loss, grad), (want_loss, want_grad) = results["rows"], results["chunked"]
    scale = want_grad.abs().max()
    equal = bool(torch.isclose(loss, want_loss, rtol=1e-4)) and bool((grad - want_grad).abs().max() <= 1e-2 * scale)
    report("loss_rows_grad_max_abs_diff_over_max", float((grad - want_grad).abs().max() / scale))
    report("loss_rows_equal_chunked", int(equal))
    report("loss_rows_speedup", ms["chunked"] / ms["rows"])
    return "rows" if equal and ms["rows"] < ms["chunked"] else "chunked"


def fit_breakdown(config: dict, accelerator: str, batches: int = 20, steps: int = 8) -> None:
    """Where fit's time goes, side by side: the train loader alone (its workers, no model; its batches hold CSR
    targets), the targets' padding on the device, and the training step alone on one resident padded batch, with the
    Memory Decoder loss and with plain cross-entropy (no targets)."""
    from lightning_memdec.kernels.memdec_loss import memdec_loss
    from lightning_memdec.training.datamodule import MemDecDataModule, pad_targets
    from lightning_memdec.training.lightning_module import MemoryDecoderModule

    data = MemDecDataModule(**config["data"])
    data.setup("fit")
    epochs = data.train_dataloader()
    loader = (b for _ in range(batches + 1) for b in epochs)  # epoch after epoch: a tiny split has few batches
    batch = next(loader)  # workers started
    _, seconds = timed(lambda: [next(loader) for _ in range(batches)])
    tokens = batch["input_ids"].numel()
    report("fit_loader_tokens_per_s", batches * tokens / seconds)
    report("fit_batch_mbytes", batch_mbytes(batch))  # what crosses the host-to-device copy: CSR targets

    dev = "cuda" if accelerator == "gpu" else "cpu"
    module = MemoryDecoderModule(config=config["model"]["config"])
    module.configure_model()
    model = module.decoder.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    pad = lambda: pad_targets(batch)  # the targets padded on the device, as the module's loss does
    pad()
    _, seconds = timed(lambda: [pad() for _ in range(steps)])
    report("fit_pad_targets_ms", 1000 * seconds / steps)
    batch = pad()
    report("fit_padded_batch_mbytes", batch_mbytes(batch))  # what the loader moved before the targets were CSR

    def losses(logits, objective: str, rows: dict):
        if objective == "ce":
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rows["labels"].flatten())
        mask = rows["loss_mask"]
        kernel = config["model"]["loss_kernel"]
        return memdec_loss(logits, rows["labels"], rows["target_ids"], rows["target_probs"], mask, kernel=kernel).loss

    def forward_backward(objective: str, rows: dict = batch):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(input_ids=rows["input_ids"], use_cache=False).logits
        losses(logits, objective, rows).backward()

    def train_steps(objective: str, rows: dict = batch):
        for _ in range(steps):
            forward_backward(objective, rows)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for objective in ("memdec", "ce"):
        train_steps(objective)  # warm-up
        _, seconds = timed(lambda objective=objective: train_steps(objective))
        report(f"fit_step_{objective}_loss_tokens_per_s", steps * tokens / seconds)
    step_parts(model, batch["input_ids"], partial(forward_backward, "memdec"), dev, steps)
    used = ("input_ids", "labels", "loss_mask", "target_ids", "target_probs")
    for factor in (2, 4):  # the same step on 2× and 4× the rows: how much a wider batch fills the card
        wide = {key: torch.cat([batch[key]] * factor) for key in used}
        train_steps("memdec", wide)  # warm-up
        _, seconds = timed(partial(train_steps, "memdec", wide))
        report(
            f"fit_step_memdec_loss_tokens_per_s_at_batch_{len(wide['input_ids'])}", steps * factor * tokens / seconds
        )


def step_parts(model, input_ids: torch.Tensor, forward_backward, dev: str, steps: int) -> None:
    """The eager step in parts, ms each: the forward alone (no graph kept), forward + loss + backward, and AdamW's
    update alone, per-parameter (``foreach``) and fused: where the step's time goes before any compilation."""

    def forward():
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            model(input_ids=input_ids, use_cache=False)

    parts = {"forward": forward, "forward_backward": forward_backward}
    for fused in (False, True) if dev == "cuda" else (False,):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        parts[f"adamw{'_fused' if fused else ''}"] = optimizer.step
    forward_backward()  # gradients for the optimizers' steps
    for name, part in parts.items():
        part()  # warm-up (the optimizers' state)
        _, seconds = timed(lambda part=part: [part() for _ in range(steps)])
        report(f"fit_{name}_ms", 1000 * seconds / steps)


def batch_mbytes(batch: dict) -> float:
    return sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor)) / 1e6


def load_decoder(path: Path):
    from lightning_memdec.hf.loading import load_causal_lm

    return load_causal_lm(path)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def generation_stage(card: Card, w: Path, large: dict, small: dict, tokens: int, window: int, new_tokens: int,
                     accelerator: str):  # fmt: skip
    from lightning_memdec.hf.loading import load_causal_lm
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM
    from lightning_memdec.inference.knnlm import KNNLM
    from lightning_memdec.inference.static_generation import StaticGenerator
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.stages.datastore import build_datastore

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base_dir = save_gpt2(w / "gpt2-large-base", **large, seed=2)
    decoder_dir = save_gpt2(w / "gpt2-small-decoder", **small, seed=3)
    corpus = random_corpus(w / "corpus-knn", tokens, seed=2)
    store = build_datastore(
        corpus,
        str(base_dir),
        w / "ds-large",
        precision="bf16",
        overwrite=True,
        windows=Windows(window=window, stride=window // 2, batch_size=16),
        hardware=Hardware(accelerator=accelerator),
    )
    index = build_index(store, w / "index-large", overwrite=True, plan=IndexSettings(factory="Flat"))
    base = load_causal_lm(base_dir, dtype=dtype).to(dev).eval()
    decoder = load_causal_lm(decoder_dir, dtype=dtype).to(dev).eval()
    mixed = InterpolatedLM(base, decoder, 0.25)
    knnlm = KNNLM(base, store, index, k=1024, temperature=16.0, lmbda=0.25)
    knnlm_exact = KNNLM(base, store, k=1024, temperature=16.0, lmbda=0.25, search="exact")  # keys on the base's device
    prompt = torch.randint(0, 50256, (1, 32), device=dev)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

    def knn_loop(lm: KNNLM, lmbda: float):
        lm.lmbda = lmbda  # λ = 0: the same cached loop without retrieval, kNN-LM's own baseline
        return lm.generate_greedy(prompt, new_tokens)

    # static caches + one compiled step a token (CUDA graphs on a GPU); the same machinery for the base alone
    length = prompt.shape[1] + new_tokens
    static = {"base": StaticGenerator(base, max_length=length), "memdec": StaticGenerator.from_interpolated(mixed,
              max_length=length)}  # fmt: skip
    runs = {
        "base_eager": lambda: base.generate(prompt, **kwargs),
        "memdec_eager": lambda: mixed.generate(prompt, **kwargs),
        "base": lambda: static["base"].generate(prompt, new_tokens, eos_token_id=None),
        "memdec": lambda: static["memdec"].generate(prompt, new_tokens, eos_token_id=None),
        "base_loop": lambda: knn_loop(knnlm, 0.0),
        "knnlm_faiss": lambda: knn_loop(knnlm, 0.25),
        "knnlm_exact": lambda: knn_loop(knnlm_exact, 0.25),
    }
    seconds = {name: seconds_per_token(run, new_tokens) for name, run in runs.items()}
    for name in runs:
        report(f"generate_{name}_ms_per_token", 1000 * seconds[name])
    report("static_memdec_tokens_equal_eager", float(torch.equal(runs["memdec"](), runs["memdec_eager"]())))
    report("memdec_eager_to_static_speedup", seconds["memdec_eager"] / seconds["memdec"])
    memdec = seconds["memdec"] / seconds["base"]  # printed with the headline, last
    generation_rooflines(card, base, decoder, seconds)
    card.headline["memdec_ms_per_token"] = 1000 * seconds["memdec"]
    card.headline["memdec_generation_overhead"] = memdec
    searches = [name for name in seconds if name.startswith("knnlm_")]
    for name in searches:
        report(f"{name}_generation_overhead", seconds[name] / seconds["base_loop"])
    # the headline compares with the fastest kNN-LM search: the strongest baseline this machine allows
    knn = min(seconds[name] for name in searches) / seconds["base_loop"]
    report("knnlm_generation_overhead", knn)
    report("knnlm_to_memdec_generation_overhead", (knn - 1) / max(memdec - 1, 1e-9))
    section("generation_overlap", overlap_rows, mixed, prompt, new_tokens, seconds["base"], runs["memdec_eager"]())
    section("generation_knnlm_static", static_knnlm_rows, knnlm_exact, prompt, new_tokens, seconds)
    if cuvs_usable():  # kNN-LM over an IVF-PQ index searched on the GPU by cuVS, the queries never on the host
        section("generation_knnlm_cuvs", cuvs_knnlm_rows, w, base, store, knn_loop, new_tokens, seconds)


def overlap_rows(mixed, prompt: torch.Tensor, new_tokens: int, base_seconds: float, eager: torch.Tensor) -> None:
    """base + MemDec with the decoder's forward on a second CUDA stream beside the base's, one captured graph
    (``StaticGenerator(overlap=True)``): ms a token, its overhead over the same static base, and whether its tokens
    equal eager ``generate()``'s. A section of its own, so that a failure here leaves the headline measured."""
    from lightning_memdec.inference.static_generation import StaticGenerator

    generator = StaticGenerator.from_interpolated(mixed, max_length=prompt.shape[1] + new_tokens, overlap=True)
    run = lambda: generator.generate(prompt, new_tokens, eos_token_id=None)
    seconds = seconds_per_token(run, new_tokens)
    report("generate_memdec_overlap_ms_per_token", 1000 * seconds)
    report("memdec_overlap_generation_overhead", seconds / base_seconds)
    report("static_memdec_overlap_tokens_equal_eager", float(torch.equal(run(), eager)))


def cuvs_knnlm_rows(w: Path, base, store: Path, knn_loop, new_tokens: int, seconds: dict) -> None:
    """kNN-LM's eager loop over an IVF-PQ index that cuVS builds and searches on the GPU: ms a token and its overhead
    over the same loop without retrieval. A section of its own: a cuVS failure leaves the other rows measured."""
    from lightning_memdec.inference.knnlm import KNNLM
    from lightning_memdec.retrieval.faiss_index import build_index

    cuvs_index = build_index(store, w / "index-large-cuvs", overwrite=True, library="cuvs", recall_queries=0)
    knnlm_cuvs = KNNLM(base, store, cuvs_index, k=1024, temperature=16.0, lmbda=0.25)
    ms = seconds_per_token(lambda: knn_loop(knnlm_cuvs, 0.25), new_tokens)
    report("generate_knnlm_cuvs_ms_per_token", 1000 * ms)
    report("knnlm_cuvs_generation_overhead", ms / seconds["base_loop"])


def static_knnlm_rows(knnlm, prompt: torch.Tensor, new_tokens: int, seconds: dict) -> None:
    """kNN-LM on base + MemDec's machinery (``StaticGenerator.from_knnlm``: static cache, the base compiled, the
    exact search over resident keys inside one captured CUDA graph): ms a token, its overhead over the same static
    base (the eager loop's overhead is over the eager loop: ratios over different bases do not compare), whether its
    tokens equal KNNLM's own loop's (bf16 near-ties aside), and kNN-LM's extra cost over MemDec's on that base."""
    from lightning_memdec.inference.static_generation import StaticGenerator

    knnlm.lmbda = 0.25
    static = StaticGenerator.from_knnlm(knnlm, max_length=prompt.shape[1] + new_tokens)

    def run():
        return static.generate(prompt, new_tokens, eos_token_id=None)

    ms = seconds_per_token(run, new_tokens)
    report("generate_knnlm_static_ms_per_token", 1000 * ms)
    report("static_knnlm_tokens_equal_loop", float(torch.equal(run(), knnlm.generate_greedy(prompt, new_tokens))))
    overhead, memdec = ms / seconds["base"], seconds["memdec"] / seconds["base"]
    report("knnlm_static_generation_overhead", overhead)
    report("knnlm_static_to_memdec_generation_overhead", (overhead - 1) / max(memdec - 1, 1e-9))


def seconds_per_token(run, new_tokens: int) -> float:
    """Best of two timed runs of ``run`` (``new_tokens`` each), after two warm-ups: kernels, caches, compilation
    and CUDA-graph capture of the static steps."""
    run()
    run()
    return min(timed(run)[1] for _ in range(2)) / new_tokens


def generation_models(w: Path, large: dict, small: dict):
    """The generation stage's base and decoder (saved once, reused) as an ``InterpolatedLM`` on the device."""
    from lightning_memdec.hf.loading import load_causal_lm
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_causal_lm(save_gpt2(w / "gpt2-large-base", **large, seed=2), dtype=dtype).to(dev).eval()
    decoder = load_causal_lm(save_gpt2(w / "gpt2-small-decoder", **small, seed=3), dtype=dtype).to(dev).eval()
    return InterpolatedLM(base, decoder, 0.25)


def beam_stage(w: Path, large: dict, small: dict, new_tokens: int, beams: int = 4) -> None:
    """Beam search of base + MemDec (the generation stage's models): StaticGenerator's compiled steps, the caches
    reordered in place inside them, beside generate()'s eager beam search, and whether their tokens agree."""
    from lightning_memdec.inference.static_generation import StaticGenerator

    mixed = generation_models(w, large, small)
    prompt = torch.randint(0, 50256, (1, 32), device=mixed.device)
    generator = StaticGenerator.from_interpolated(mixed, max_length=prompt.shape[1] + new_tokens)
    settings = {"num_beams": beams, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    static_beside_eager(f"memdec_beam{beams}", mixed, generator, prompt, new_tokens, settings)


def served_batch_stage(w: Path, large: dict, small: dict, new_tokens: int, rows: int = 8) -> None:
    """What ``memdec serve`` decodes for ``rows`` concurrent requests of different lengths (left-padded, greedy):
    StaticGenerator with ``batch_rows`` (``--decoding static``) beside generate() eagerly (``eager``): tokens/s of
    the batch, and whether their tokens agree."""
    from lightning_memdec.hf.left_padding import left_pad
    from lightning_memdec.inference.static_generation import StaticGenerator

    mixed = generation_models(w, large, small)
    lengths = torch.linspace(8, 32, rows).int().tolist()
    ids, mask = (t.to(mixed.device) for t in left_pad([torch.randint(0, 50256, (n,)).tolist() for n in lengths], 0))
    generator = StaticGenerator.from_interpolated(mixed, max_length=ids.shape[1] + new_tokens, batch_rows=rows)
    settings = {"attention_mask": mask, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    static_beside_eager(f"served_batch{rows}", mixed, generator, ids, new_tokens, settings)


def static_beside_eager(prefix: str, mixed, generator, ids: torch.Tensor, new_tokens: int, settings: dict) -> None:
    """Decode ``new_tokens`` after the prompts ``ids`` [B, T] with the same settings through ``mixed.generate()``
    (eagerly) and ``generator`` (a StaticGenerator of it): per step and tokens/s, whether their tokens agree on
    this device, and the speed-up."""

    def eager():
        return mixed.generate(ids, max_new_tokens=new_tokens, **settings)

    def static():
        return generator.generate(ids, new_tokens, **settings)

    seconds = {"eager": seconds_per_token(eager, new_tokens), "static": seconds_per_token(static, new_tokens)}
    for name, step in seconds.items():
        report(f"{prefix}_{name}_ms_per_step", 1000 * step)
        report(f"{prefix}_{name}_tokens_per_s", len(ids) / step)
    fixed, free = static(), eager()
    report(f"{prefix}_static_tokens_equal_eager", float(torch.equal(fixed, free)))
    if fixed.shape == free.shape and not torch.equal(fixed, free):
        divergence(prefix, mixed, fixed, free, ids.shape[1], settings.get("attention_mask"))
    report(f"{prefix}_eager_to_static_speedup", seconds["eager"] / seconds["static"])


def divergence(prefix: str, mixed, fixed: torch.Tensor, free: torch.Tensor, prompt: int, mask) -> None:
    """Where static and eager tokens first differ, and by how much the mixture preferred eager's token there (its
    log-prob minus static's, nats, scored eagerly): near 0, a near-tie that rounding (bf16, other kernels) can flip;
    large, a bug."""
    differ = fixed[:, prompt:] != free[:, prompt:]
    report(f"{prefix}_static_tokens_agree_fraction", 1 - differ.float().mean().item())
    step = int(differ.any(0).nonzero()[0])  # the first step where some row differs
    row = int(differ[:, step].nonzero()[0])
    context = free[row : row + 1, : prompt + step]
    row_mask = None if mask is None else torch.cat([mask[row : row + 1], context.new_ones(1, step)], 1)
    log_probs = mixed.log_probs(context, row_mask)[0, -1].float()
    report(f"{prefix}_first_divergence_step", step)
    gap = log_probs[free[row, prompt + step]] - log_probs[fixed[row, prompt + step]]
    report(f"{prefix}_divergence_logprob_gap", gap.item())


def search_scale_stage(card: Card, store_dir: Path, sizes: list[int], k: int, noise_scale: float = 0.25,
                       seed: int = 0) -> None:  # fmt: skip
    """kNN-LM's retrieval for one generated token (batch 1) as the datastore grows: exact search over keys resident
    on the device (``knn_search_exact_ms_at_<N>``) and, where cuVS is installed, its IVF-PQ with the plan ``auto``
    gives for N (``knn_search_cuvs_ms_at_<N>``). A decoding step adds this to the base's step. Entries past the real
    store's are synthetic, made on the device as ``latency_stores.synthetic_datastore`` makes them on disk: a real
    key + Gaussian noise of ``noise_scale`` × the real keys' per-dimension std, in fp16. A size whose keys, their
    norms and 2 GiB of working room (the synthetic blocks, the search's) exceed 90 % of the free device memory is
    reported as not fitting (streaming them would time PCIe): 50 M × 1,280 fp16 keys are 128 GB, which an H200's
    143,771 MiB can hold, where the 40 % build_targets leaves keys resident in could not. Beside each search, its
    bound (``_bound``: the keys read once at the card's HBM rate) and, on a GPU, the same search replayed as one CUDA
    graph (``knn_search_exact_graph_ms_at_<N>``, with whether its neighbours equal the eager call's): at batch 1 the
    search's launches may cost more than its bytes, and kNN-LM deserves its fastest search."""
    from lightning_memdec.io.capacity import available_ram, free_device_memory
    from lightning_memdec.retrieval.exact_search import exact_search, squared_norms
    from lightning_memdec.retrieval.search_budget import memory_budget

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = torch.from_numpy(np.asarray(Datastore(store_dir).keys)).to(dev)  # [R, d] fp16
    sigma = noise_scale * real.float().std(dim=0)
    generator = torch.Generator(dev).manual_seed(seed)
    query = real[:1].float() + sigma * torch.randn(1, real.shape[1], generator=generator, device=dev)
    for n in sizes:
        free = free_device_memory(dev) if dev.type == "cuda" else available_ram()
        if n * (real.shape[1] * 2 + 4) + 2**31 > 0.9 * free:
            report(f"knn_search_exact_ms_at_{n}", f"keys of {n * real.shape[1] * 2 / 1e9:.1f} GB (+ norms, 2 GiB) do "
                   f"not fit 90% of the {free / 1e9:.1f} GB free")  # fmt: skip
            continue
        keys = torch.empty(n, real.shape[1], dtype=torch.float16, device=dev)
        keys[: min(n, len(real))] = real[:n]
        for start in range(len(real), n, 1 << 17):  # synthetic entries, a block at a time (fp32 temporaries < 2 GiB)
            rows = min(1 << 17, n - start)
            source = torch.randint(0, len(real), (rows,), generator=generator, device=dev)
            noise = torch.randn(rows, real.shape[1], generator=generator, device=dev)
            keys[start : start + rows] = (real[source].float() + sigma * noise).half()
        norms = squared_norms(keys)
        budget = memory_budget(dev)  # given, so that the graph's capture reads no device memory figures
        search = partial(exact_search, query, keys, k, device=dev, key_norms=norms, memory_bytes=budget)
        search()  # warm-up
        report(f"knn_search_exact_ms_at_{n}", median_ms(search))
        report(f"knn_search_exact_ms_at_{n}_bound", 1000 * keys.numel() * keys.element_size() / card.peak_bytes_per_s)
        section(f"knn_search_breakdown_at_{n}", batch1_breakdown, keys, norms, query, k, n)
        if dev.type == "cuda":
            section(f"knn_search_exact_graph_at_{n}", graph_rows, search, n)
        if cuvs_usable():  # own sections: an index that does not fit beside the resident keys stops only its row
            torch.cuda.empty_cache()  # cuVS allocates outside torch's cache (RMM): give it what the cache holds
            section(f"knn_search_cuvs_exact_at_{n}", cuvs_exact_row, search, n)
            section(f"knn_search_cuvs_at_{n}", cuvs_scale_row, keys, k, query, n)
        del keys, norms, search  # before the next size's keys are made
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def batch1_breakdown(keys: torch.Tensor, norms: torch.Tensor, query: torch.Tensor, k: int, n: int) -> None:
    """Where a batch-1 search's time goes (kNN-LM's, each token), as search_breakdown's rows for one call at the
    library's block size: the products over all keys (``search_batch1_at_<n>_products_ms``), then one block's
    selection scaled to the store, the library's single-row ``topk`` (``..._select_one_stage_ms``) beside the two
    designs. One row leaves most of the GPU idle in a ``topk`` over all of it, where the two-stage design's first
    stage is a batched ``topk`` over many narrow rows: if it is faster here, calls of few queries should take it."""
    _, m, qc, size = search_call(keys, query, k)
    block_times(f"_batch1_at_{n}", partial(block_scores, qc, keys, norms, size), size, len(keys), m)


def graph_rows(search, n: int) -> None:
    """``search()`` captured once as a CUDA graph (after a warm-up on a side stream, as torch.cuda.graph asks) and
    replayed: its ms (median of five) and whether its neighbours equal an eager call's."""
    want = search()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        search()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = search()
    graph.replay()
    report(f"knn_search_exact_graph_equal_at_{n}", int(torch.equal(got[1], want[1])))
    report(f"knn_search_exact_graph_ms_at_{n}", median_ms(graph.replay))


def median_ms(run, repeats: int = 5) -> float:
    """The median of ``repeats`` timed calls of ``run``, in ms."""
    return 1000 * float(np.median([timed(run)[1] for _ in range(repeats)]))


def cuvs_exact_row(search, n: int) -> None:
    """``knn_search_cuvs_exact_ms_at_<n>``: the same exact search with cuVS's brute force choosing the candidates,
    and whether its neighbours equal the topk selection's."""
    cuvs = partial(search, selection="cuvs")
    want = search()[1]
    report(f"knn_search_cuvs_exact_equal_at_{n}", int(torch.equal(cuvs()[1], want)))
    report(f"knn_search_cuvs_exact_ms_at_{n}", median_ms(cuvs))


def cuvs_scale_row(keys: torch.Tensor, k: int, query: torch.Tensor, n: int) -> None:
    """``knn_search_cuvs_ms_at_<n>``: a batch-1 search of a cuVS IVF-PQ over ``keys`` (built here, then freed)."""
    search = cuvs_search(keys, k, query)
    search()  # warm-up
    report(f"knn_search_cuvs_ms_at_{n}", median_ms(search))


def cuvs_search(keys: torch.Tensor, k: int, query: torch.Tensor):
    """A cuVS IVF-PQ over ``keys`` (on their GPU, the plan ``auto`` gives for their count) and a batch-1 search."""
    from lightning_memdec.retrieval.cuvs_index import CuvsIVFPQ
    from lightning_memdec.retrieval.index_plan import plan_index

    plan = plan_index(len(keys), keys.shape[1])
    index = CuvsIVFPQ(keys.shape[1], plan.factory, keys.device, nprobe=32)
    sample = torch.randperm(len(keys), device=keys.device)[: plan.train_size].sort().values
    index.train(keys[sample])
    for start in range(0, len(keys), 1 << 20):
        index.add(keys[start : start + (1 << 20)])
    return lambda: index.search_tensors(query, k)


def generation_rooflines(card: Card, base, decoder, seconds: dict) -> None:
    """Batch-1 decoding reads every weight once a token: the bound is the weights' bytes at the card's bandwidth;
    MemDec's overhead bound is 1 + FLOPs(decoder)/FLOPs(base) (issue 20), compared with the measured ratio."""
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in (("base", base),
               ("decoder", decoder))}  # fmt: skip
    for name, read in (("base", weights["base"]), ("memdec", weights["base"] + weights["decoder"])):
        bound_ms = 1000 * read / card.peak_bytes_per_s
        report(f"generate_{name}_ms_per_token_bound", bound_ms)
        report(f"generate_{name}_roofline_fraction", bound_ms / (1000 * seconds[name]))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("base", base), ("decoder", decoder))}
    report("memdec_generation_overhead_bound", 1 + params["decoder"] / params["base"])


def main(
    workdir: Path = Path("runs/bench-gpu"),
    tiny: bool = False,
    tokens: int = 2_000_000,
    queries: int = 100_000,
    k: int = 1024,
    window: int = 1024,
    fit_steps: int = 60,
    fit_batch: int = 8,
    knn_tokens: int = 500_000,
    scale_sizes: tuple[int, ...] = (500_000, 5_000_000, 50_000_000),
    new_tokens: int = 64,
    fast_fit: bool | None = None,
    time_limit_s: float | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Run the GPU stages and print their rates (``--tiny true``: small shapes on CPU, for CI).

    ``fast_fit``: train with torch.compile, fused AdamW and a vocabulary padded to 64 (default: on a GPU).
    ``time_limit_s``: stop the stage running then, skip the rest and print the headline (nan where not measured).
    ``skip``: stages not to run (a device rerun of the others; fit needs datastore and targets, search_scale
    generation's store)."""
    unknown = set(skip) - set(STAGES)
    if unknown:
        raise ValueError(f"--skip names unknown stages {sorted(unknown)}; the stages are {list(STAGES)}")
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    small, large = (TINY, TINY) if tiny else (GPT2_SMALL, GPT2_LARGE)
    if tiny:
        tokens, queries, k, window, fit_steps, fit_batch, knn_tokens, new_tokens = 4000, 600, 96, 64, 2, 2, 3000, 4
        scale_sizes = (3000, 20_000)
    w = Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    report("device", device_name())
    report("torch", torch.__version__)
    card = Card.this_device()
    fast = torch.cuda.is_available() if fast_fit is None else fast_fit
    report("cuvs", "installed: its IVF-PQ rows follow" if cuvs_usable() else "not installed or no GPU: no cuVS rows")
    triton = importlib.util.find_spec("triton") and importlib.metadata.version("triton")
    report("triton", triton or "not installed: the threshold selection and re-ranking take their torch paths")
    run = partial(section, skipped=skip)
    start_time_limit(time_limit_s)
    try:
        built = run("datastore", datastore_stage, card, w, small, tokens, window, accelerator)
        made = built and run("targets", targets_stage, card, w, *built, queries, window, k, accelerator)
        if made:
            run("fit", fit_stage, card, w, small, *made, window, fit_steps, fit_batch, k, accelerator, fast)
        run("generation", generation_stage, card, w, large, small, knn_tokens, window, new_tokens, accelerator)
        run("search_scale", search_scale_stage, card, w / "ds-large", scale_sizes, 1024)  # the kNN-LM rows' k
        run("beam", beam_stage, w, large, small, new_tokens)  # last: no headline figure depends on these
        run("served_batch", served_batch_stage, w, large, small, new_tokens)
        check_time_limit()  # the last stage's signal may have been lost too
    except TimeLimitReached as err:
        report("time_limit", f"{err}: the stage running then and those after it are not measured")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    for name in HEADLINE:  # last, in this order, whatever failed above
        report(name, float(card.headline[name]))


if __name__ == "__main__":
    CLI(main, as_positional=False)
