"""kNN training targets: for every query position, the sparse next-token distribution of its neighbours.

p_kNN(y | x) = Σ_{j ∈ N(x), v_j = y} softmax_j(−d(x, k_j) / T), with d the squared L2 distance. Stored
as CSR, position-aligned with the query corpus: row ``i`` is ``ids[offsets[i]:offsets[i+1]]`` with
``probs`` (fp16) sorted by probability. Query chunks are spread over ranks like the datastore's windows, and kept
by their ranges of positions, so a resume may use another ``--search.chunk_size`` (:mod:`~stages.chunked_predict`);
each rank searches a replica of the FAISS index, or (``search="exact"``) all keys by blocked matrix products on its
own device (:mod:`lightning_memdec.retrieval.exact_search`), building the sparse rows there too
(:class:`~lightning_memdec.stages.target_searcher.KNNTargetSearcher`). Only the FAISS backend imports faiss.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lightning_memdec.io.artifact_dirs import (
    ArtifactError,
    base_meta,
    is_secondary_rank,
    meta_sha256,
    publish,
    read_meta,
    start_work_dir,
)
from lightning_memdec.io.capacity import available_ram, check_fits
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import INDEX, Datastore, check_compatible, check_index_matches
from lightning_memdec.retrieval import cuvs_exact, cuvs_index
from lightning_memdec.retrieval.exact_search import (
    SEARCH_BACKENDS,
    choose_search,
    default_compute_dtype,
)
from lightning_memdec.retrieval.index_plan import check_gpu_k, plan_index
from lightning_memdec.retrieval.search_budget import check_search_budget, memory_budget, rerank_margin
from lightning_memdec.retrieval.sharded_search import check_shards_hold_k
from lightning_memdec.stages.chunk_ranges import convert_number_markers, drop_progress, recorded_setting
from lightning_memdec.stages.chunked_predict import finish_chunks, run_sharded_predict
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch
from lightning_memdec.stages.target_chunks import (
    CHUNK_SUFFIXES,
    CHUNKS,
    ChunkFileWriter,
    drop_damaged_chunks,
    merge_chunks,
)
from lightning_memdec.stages.target_inputs import check_finite_store_keys, check_values_in_vocab
from lightning_memdec.stages.target_searcher import KNNTargetSearcher
from lightning_memdec.stages.targets_disk import TargetsDiskWatch, check_disk

log = logging.getLogger(__name__)


@exclusive_output
def build_targets(
    datastore: Path,
    index: Path | None = None,
    out: Path | None = None,
    queries: Path | None = None,
    knn: KNNTargets = KNNTargets(),
    search: TargetSearch = TargetSearch(),
    hardware: Hardware = Hardware(),
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Build sparse kNN next-token distributions for every position of a corpus.

    Args:
        datastore: the datastore searched (its values are the predicted tokens).
        index: index over that datastore, from `memdec build-index` (FAISS, or cuVS: searched on this rank's GPU,
            its neighbours made into rows there); not needed (and not read) with
            ``--search.backend exact``.
        out: output targets directory (required).
        queries: datastore of the positions to build targets for (its keys are the queries); default: the
            searched datastore itself, with each position's own entry excluded by id. Use a datastore of
            the validation split to build validation targets.
        knn: kNN search and pruning of each position's distribution (k is capped at the store size, with a warning).
        search: how neighbours are searched (backend, device, memory; sharded keys for stores larger than a rank's
            device) and the query chunks.
        hardware: the ranks the query chunks are spread over.
        overwrite: replace an existing output / discard an unfinished run with other settings.
    """
    if out is None:
        raise ValueError("out (the targets directory to write) is required.")
    store = Datastore(datastore)
    query_store = Datastore(queries) if queries is not None else store
    check_compatible(query_store, store)
    self_exclude = query_store.same_entries(store)
    if index is not None:  # checked whichever backend runs: an index over another store is a mistake
        check_index_matches(index, read_meta(index, kind="index"), store)
    backend = pick_search(search.backend, index, store, hardware.accelerator)
    if search.shard_keys and backend != "exact":
        raise ValueError(
            f"--search.shard_keys needs the exact backend (the search ran would be {backend!r}); "
            "pass --search.backend exact."
        )
    if backend == "faiss" and search.use_gpu:
        check_gpu_k(knn.k, self_match=self_exclude)
    factory, index_nprobe, library = searched_index(index) if backend == "faiss" else (None, None, None)
    warn_ignored_settings(search, knn.nprobe, backend)
    check_selection(search.selection, backend, hardware.accelerator)
    available = len(store) - (1 if self_exclude else 0)
    k, hw = capped_k(knn.k, available), hardware
    if search.shard_keys and str(hw.devices).isdigit():  # up front where the rank count is known; else in each rank
        check_shards_hold_k(len(store), int(hw.devices) * hw.num_nodes, k, self_exclude)
    memory = None if search.memory_gb is None else int(search.memory_gb * 2**30)
    check_ranks_fit(backend, index, store.dim, min(search.chunk_size, len(query_store)), k, available, memory,
                    hw, search.use_gpu)  # fmt: skip
    check_disk(out, len(query_store), min(k, knn.max_support or k), watched=not search.shard_keys)
    run_config = {
        "queries": query_store.identity(),
        "datastore": store.identity(),
        "search": backend,
        "index": None if backend != "faiss" else {"factory": factory, "library": library, "meta": meta_sha256(index)},
        "k": k,
        "temperature": knn.temperature,
        "exact_distances": knn.exact_distances,
        "max_support": knn.max_support,
        "min_prob": knn.min_prob,  # not the chunk size: a resume may use another (chunks are kept by their ranges)
        "nprobe": None if backend == "exact" else knn.nprobe or index_nprobe,  # a rebuilt index: another resume
    }
    check_store(store, backend)
    work = resumed_work_dir(out, run_config, overwrite, len(query_store))
    paths = (str(query_store.dir), str(store.dir), str(index), str(work))
    settings = (k, knn.temperature, self_exclude, knn.exact_distances, knn.max_support, knn.min_prob,
                search.chunk_size, knn.nprobe, search.use_gpu)  # fmt: skip
    searcher = KNNTargetSearcher(*paths, *settings, backend, memory, search.shard_keys, search.selection)
    watch = [] if search.shard_keys else [TargetsDiskWatch(work, len(query_store), search.chunk_size)]
    trainer = run_sharded_predict(searcher, ChunkFileWriter(work), work, hw.accelerator, hw.devices, hw.strategy,
                                  hw.num_nodes, [*watch, *callbacks])  # fmt: skip
    if not trainer.is_global_zero:
        return Path(out)
    finish_chunks(work, len(query_store), "positions")
    num_positions, nnz = merge_chunks(work, len(query_store))
    drop_progress(work)  # before the chunk files go: markers without their chunks would resume into nothing
    shutil.rmtree(work / CHUNKS)
    settings = {k_: run_config[k_] for k_ in ("search", "k", "temperature", "max_support", "min_prob", "nprobe")}
    # index_library: faiss or cuvs, which library searched the index (None: no index)
    settings |= {"exact_distances": knn.exact_distances or backend == "exact", "index_library": library}
    return publish(work, out, targets_meta(store, query_store, factory, num_positions, nnz, self_exclude, settings))


def check_store(store: Datastore, backend: str) -> None:
    """Before any search: the values must be ids of the store's tokenizer, and the keys an exact search reads
    finite (a FAISS index was built from finite keys: build-index checks them). One pass over the store's files, by
    the rank that prepares the work directory."""
    if is_secondary_rank():
        return
    check_values_in_vocab(store)
    if backend == "exact":
        check_finite_store_keys(store)


def resumed_work_dir(out: Path, run_config: dict, overwrite: bool, num_positions: int) -> Path:
    """The work directory (:func:`~io.artifact_dirs.start_work_dir`), the chunks of a resumed run checked by the rank
    that prepares it (:func:`~stages.target_chunks.drop_damaged_chunks`); those of an earlier version, marked by
    number, first recorded by their ranges, from the chunk size it recorded."""
    work = start_work_dir(out, run_config, overwrite)
    if not is_secondary_rank():
        chunk_size = recorded_setting(work, "chunk_size")
        convert_number_markers(work, chunk_size, num_positions, work / CHUNKS, CHUNK_SUFFIXES)
        drop_damaged_chunks(work, num_positions)
    return work


def warn_ignored_settings(search: TargetSearch, nprobe: int | None, backend: str) -> None:
    """Before any work: a setting the chosen backend ignores is said (the run, and its targets, are the same with
    or without it; a user who set it expected otherwise): exact search's selection under an index, an index's device
    and lists under exact search."""
    if backend != "exact" and search.selection != "auto":
        log.warning("--search.selection %s chooses exact search's candidates; the %s backend ignores it.",
                    search.selection, backend)  # fmt: skip
    if backend == "exact" and search.use_gpu:
        log.warning("--search.use_gpu searches a FAISS index on the GPU; exact search runs on --hardware.accelerator's "
                    "device and ignores it.")  # fmt: skip
    if backend == "exact" and nprobe is not None:
        log.warning("--knn.nprobe %d sets the IVF lists an index search visits; exact search visits every key and "
                    "ignores it.", nprobe)  # fmt: skip


def check_selection(selection: str, backend: str, accelerator: str) -> None:
    """Before any work: exact search's ``cuvs`` selection needs cuVS, a GPU and the ranks on it."""
    if backend == "exact" and selection == "cuvs":
        cuvs_exact.brute_force_api(), cuvs_index.cuvs_device()
        if not on_cuda(accelerator):
            raise ValueError(
                f"--search.selection cuvs searches keys on a GPU, and --hardware.accelerator {accelerator} runs the "
                "search on the CPU: pass --hardware.accelerator gpu, or use --search.selection topk or threshold on "
                "the CPU."
            )


def searched_index(index: Path) -> tuple[str, int, str]:
    """Factory, nprobe and library of the index the ranks will search, from its meta.json only (the ranks load the
    index; a copy here would stay for the whole run). A cuVS index needs cuVS and a GPU here: checked before work."""
    meta = read_meta(index, kind="index")
    library = meta.get("library", "faiss")
    if library == "cuvs":
        cuvs_index.cuvs_api(), cuvs_index.cuvs_device()
    return meta["factory"], meta["nprobe"], library


def capped_k(k: int, available: int) -> int:
    """k, or the number of entries a query can retrieve when the store holds fewer (with a warning)."""
    if k > available:
        log.warning("k=%d exceeds the %d entries available; using k=%d.", k, available, available)
    return min(k, available)


def pick_search(search: str, index: Path | None, store: Datastore, accelerator: str) -> str:
    """The backend ``--search.backend`` names; ``auto`` follows :func:`choose_search` for this accelerator."""
    if search not in SEARCH_BACKENDS:
        raise ValueError(f"search must be one of {SEARCH_BACKENDS}, got {search!r}.")
    if search == "faiss" and index is None:
        raise ValueError(
            "--search.backend faiss needs an index (memdec build-index); or use --search.backend exact (no index)."
        )
    if search == "exact" and index is not None:
        log.info("search='exact' searches all keys directly; the index %s is not used.", index)
    if search != "auto":
        return search
    device = "cuda" if on_cuda(accelerator) else "cpu"
    chosen = choose_search(len(store), store.dim, device, have_index=index is not None)
    log.info("search: %s (--search.backend auto, %d keys of %d dims on the %s)", chosen, len(store), store.dim, device)
    return chosen


def on_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` puts the ranks on CUDA devices here."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_ranks_fit(
    search: str,
    index: Path | None,
    dim: int,
    chunk: int,
    k: int,
    available: int,
    memory: int | None,
    hardware: Hardware,
    use_gpu: bool,
) -> None:
    """Before any search: each rank's exact-search budget must hold a chunk's queries and top-k, and on the host the
    ranks of this node together must fit the RAM (each holds its own FAISS index replica, or its exact budget)."""
    accelerator, devices = hardware.accelerator, hardware.devices
    on_host = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    ranks = int(devices) if str(devices).isdigit() else 1
    if search == "exact" and (on_host or memory is not None):
        dtype = default_compute_dtype("cpu") if on_host else torch.bfloat16  # bf16: the widest margin on a GPU
        budget = memory_budget("cpu", memory)
        check_search_budget(chunk, dim, min(available, k + rerank_margin(k, dtype)), budget, dtype)
        if on_host:
            fix = "pass --hardware.devices lower or --search.memory_gb lower (smaller key blocks, same result)."
            check_fits(ranks * budget, available_ram(), f"{ranks} ranks' exact-search blocks on this host", fix)
    meta = read_meta(index, kind="index") if search == "faiss" else {}
    if search == "faiss" and not use_gpu and meta.get("library") != "cuvs":  # a cuVS index is on each rank's GPU
        path = Path(index) / INDEX
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the index.")
        replica = plan_index(meta["ntotal"], meta["dim"], factory=meta["factory"]).index_bytes  # loaded, with tables
        fix = (
            "pass --hardware.devices lower (fewer ranks per node), search on GPUs (--search.use_gpu true, or "
            "--search.backend exact on a GPU), or build an index with fewer bytes per key (a smaller PQ m)."
        )
        check_fits(ranks * replica, available_ram(), f"{ranks} ranks' FAISS index replicas in RAM", fix)


def targets_meta(
    store: Datastore,
    queries: Datastore,
    index_factory: str | None,
    num_positions: int,
    nnz: int,
    self_excluded: bool | None,
    settings: dict,
) -> dict:
    """meta.json of a targets directory: what was searched, with which settings, for which corpus and tokenizer."""
    return base_meta(
        "targets",
        num_positions=num_positions,
        nnz=nnz,
        self_excluded=self_excluded,
        index_factory=index_factory,
        datastore=str(store.dir.resolve()),
        queries=queries.identity(),
        corpus=queries.meta["corpus"],
        corpus_sha256=queries.meta["corpus_sha256"],
        model=store.meta["model"],
        model_sha256=store.meta.get("model_sha256"),
        layer=store.meta["layer"],
        tokenizer=store.tokenizer,
        **settings,
    )
