"""Indexes over datastore keys: build from a factory string, load, search; FAISS, or cuVS on a GPU.

Exact ``Flat`` search suits small stores; ``IVF<nlist>,PQ<m>`` compresses large ones (the paper's
setting). ``auto`` picks by store size. Distances are squared L2 throughout. FAISS indexes are CPU files (searched on
the host, or on GPUs by a faiss GPU build); ``library="cuvs"`` builds the same IVF-PQ plan with cuVS, trained, filled
and searched on one GPU (:mod:`~lightning_memdec.retrieval.cuvs_index`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_memdec.io.artifact_dirs import ArtifactError, base_meta, publish, read_meta, start_work_dir
from lightning_memdec.io.capacity import available_ram, check_fits
from lightning_memdec.io.npy_rows import gather_rows, read_rows
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import INDEX, Datastore, check_finite_keys, check_index_matches
from lightning_memdec.io.settings import check_positive
from lightning_memdec.retrieval import cuvs_index
from lightning_memdec.retrieval.cuvs_index import CUVS_INDEX, CuvsIVFPQ
from lightning_memdec.retrieval.index_plan import (
    MIN_TRAIN_PER_LIST,
    IndexPlan,
    gpu_pq_options,
    plan_index,
)
from lightning_memdec.retrieval.settings import IndexSettings

log = logging.getLogger(__name__)
LIBRARIES = ("faiss", "cuvs")


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index, device: int | None = None) -> faiss.Index:
    """The index on one GPU (``device``: this rank's), or sharded over all visible GPUs when ``device`` is None.

    Under several ranks each must pass its own device: cloning to all GPUs on every rank makes N² copies. An IVF-PQ
    gets the cloner options faiss-gpu needs for its shape (:func:`~retrieval.index_plan.gpu_pq_options`).
    """
    if not gpu_available():
        raise RuntimeError(
            "use_gpu was asked for, but this faiss has no GPU support: replace faiss-cpu by a GPU build "
            "(pip uninstall -y faiss-cpu && pip install faiss-gpu), or use search='exact' (docs/gpu.md)."
        )
    options = faiss.GpuMultipleClonerOptions() if device is None else faiss.GpuClonerOptions()
    options.usePrecomputed, options.useFloat16 = gpu_pq_options(index.d, pq_bytes(index))
    if device is None:
        return faiss.index_cpu_to_all_gpus(index, options)
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index, options)


def pq_bytes(index: faiss.Index) -> int | None:
    """Code bytes per key of an IVF-PQ index; None for any other index."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None
    return int(ivf.pq.M) if isinstance(ivf, faiss.IndexIVFPQ) else None


def set_nprobe(index, nprobe: int | None) -> None:
    if nprobe is None:
        return
    if isinstance(index, CuvsIVFPQ):
        index.nprobe = nprobe
        return
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index: nothing to probe
    try:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except (AttributeError, RuntimeError):
        pass


@exclusive_output
def build_index(
    datastore: Path,
    out: Path,
    plan: IndexSettings = IndexSettings(),
    add_batch: int = 65_536,
    use_gpu: bool = False,
    library: str = "faiss",
    recall_queries: int = 256,
    recall_k: int = 64,
    plan_only: bool = False,
    overwrite: bool = False,
) -> Path | IndexPlan:
    """Build an index over a datastore's keys; prints its plan first and records its measured recall.

    Args:
        datastore: datastore directory from `memdec build-datastore`.
        out: output index directory.
        plan: what the index plan is made from (layout or auto, memory budget, nprobe), the training sample, seed.
        add_batch: keys read and added per step (read from the file, not mapped: resident memory stays one batch).
        use_gpu: FAISS: train and add on all visible GPUs (needs a faiss GPU build); the saved index is a CPU index.
        library: faiss (a CPU index file) or cuvs (an IVF-PQ trained, filled and searched on the current GPU by
            cuVS, ``pip install -e ".[gpu]"``; searched on a GPU only).
        recall_queries: stored keys used as queries to measure recall@k against exact search (0: skip).
        recall_k: the k of that recall.
        plan_only: print the plan (index size, memory, training sample, search cost) and stop.
        overwrite: replace an existing output.
    """
    if library not in LIBRARIES:
        raise ValueError(f"--library must be one of {LIBRARIES}, got {library!r}.")
    if library == "cuvs" and use_gpu:
        raise ValueError("--use_gpu asks faiss-gpu to build; --library cuvs always builds on the GPU: drop --use_gpu.")
    check_positive("--add_batch", add_batch, whole=True)  # -1 published an empty index, 0 failed mid-build
    store = Datastore(datastore)
    n, d = len(store), store.dim
    spec = plan  # the settings; ``plan`` becomes the plan made from them
    plan = plan_index(n, d, memory_gb=spec.memory_gb, gpu=use_gpu, nprobe=spec.nprobe, factory=spec.factory)
    print(plan.describe(), flush=True)
    if plan_only:
        return plan
    train_size, seed, nprobe = plan.train_size if spec.train_size is None else spec.train_size, spec.seed, spec.nprobe
    index = empty_index(library, d, plan.factory, nprobe)  # an invalid factory named before its costs are checked
    check_build_fits(plan, min(n, train_size) if plan.train_size else 0, use_gpu)
    check_recall_k(recall_queries, recall_k)
    run = index_run_settings(store, library, plan.factory, train_size, seed, nprobe, (recall_queries, recall_k))
    work = start_work_dir(out, run, overwrite)
    if use_gpu:
        index = to_gpu(index)
    train_on_sample(index, store, train_size, seed)
    for start in tqdm(range(0, n, add_batch), desc="build-index", unit="batch"):
        rows = read_rows(store.keys, start, start + add_batch)
        check_finite_keys(rows, start, f"datastore {datastore}")
        index.add(np.ascontiguousarray(rows, dtype=np.float32))
    if use_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_nprobe(index, nprobe)
    recall = measured_recall(index, store, recall_queries, recall_k, seed) if recall_queries > 0 else None
    if recall is not None:
        print(describe_recall(recall))
    if library == "cuvs":
        index.save(work / CUVS_INDEX)
    else:
        faiss.write_index(index, str(work / INDEX))
    return publish(work, out, index_meta(index, plan, store, train_size, nprobe, recall, library))


def index_run_settings(store: Datastore, library: str, factory: str, train_size: int, seed: int, nprobe: int,
                       recall: tuple[int, int]) -> dict:  # fmt: skip
    """An index build's run settings: all that its meta.json records (a rerun after a stop inside the publication
    that differs in any of them is another run); ``recall``: (queries, k), its k not recorded when none is measured."""
    return {"datastore": store.identity(), "library": library, "factory": factory, "train_size": train_size,
            "seed": seed, "nprobe": nprobe, "recall": list(recall) if recall[0] > 0 else None}  # fmt: skip


def empty_index(library: str, d: int, factory: str, nprobe: int):
    """The untrained index ``factory`` describes: a FAISS index, or a cuVS IVF-PQ on the current GPU (its
    installation, the layout and the GPU checked here, before any work)."""
    if library == "cuvs":
        cuvs_index.cuvs_api(), cuvs_index.ivf_pq_shape(factory)  # the install, the layout, then the GPU
        return CuvsIVFPQ(d, factory, cuvs_index.cuvs_device(), nprobe)
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dimension {d}: {err}") from err


def train_on_sample(index: faiss.Index, store: Datastore, train_size: int, seed: int) -> None:
    """Train an untrained index (IVF's coarse quantizer, PQ's codebooks) on ``train_size`` keys sampled (seeded)
    across the whole store; an index that needs no training (Flat) is left as it is."""
    if index.is_trained:
        return
    size = min(len(store), train_size)
    sample = np.sort(np.random.default_rng(seed).choice(len(store), size=size, replace=False))
    log.info("training the index on %d keys", size)
    index.train(np.ascontiguousarray(gather_rows(store.keys, sample), dtype=np.float32))


def index_meta(
    index, plan: IndexPlan, store: Datastore, train_size: int, nprobe: int, recall, library: str = "faiss"
) -> dict:
    """meta.json of an index directory: what it indexes, with which library, how it was built, its plan and recall."""
    return base_meta(
        "index",
        library=library,
        factory=plan.factory,
        dim=store.dim,
        ntotal=int(index.ntotal),
        metric="squared_l2",
        nprobe=nprobe,
        train_size=int(min(len(store), train_size)) if plan.train_size else 0,
        plan={"index_bytes": plan.index_bytes, "flops_per_query": plan.flops_per_query, "notes": plan.notes},
        recall=recall,
        datastore=str(store.dir.resolve()),
        datastore_identity=store.identity(),
        tokenizer=store.tokenizer,
    )


def check_build_fits(plan: IndexPlan, train_size: int, use_gpu: bool) -> None:
    """The index being built and its float32 training sample are held in RAM together (on the host even when
    ``use_gpu``, where the built index comes back): refuse before training when they exceed the available RAM,
    or when an IVF index gets fewer training keys than it has lists (FAISS's clustering fails on it)."""
    if plan.nlist and train_size < plan.nlist:
        raise ValueError(
            f"--plan.train_size gives {train_size} training keys, fewer than the {plan.nlist} lists of {plan.factory}; "
            f"give --plan.train_size {plan.nlist} or more (FAISS advises 39 per list), or a factory with fewer lists."
        )
    minimum = plan.pq_centroids or 1  # k-means of PQ's codebooks needs a key per centroid (256 for 8-bit codes)
    if plan.train_size and not plan.nlist and train_size < minimum:
        raise ValueError(
            f"--plan.train_size gives {train_size} training keys, too few to train {plan.factory}; give "
            f"--plan.train_size {minimum} or more (FAISS advises {MIN_TRAIN_PER_LIST} per PQ centroid)."
        )
    needed = plan.index_bytes + train_size * plan.dim * 4
    fix = (
        "pass --plan.memory_gb lower (a smaller training sample, fewer lists) or --plan.train_size, or a factory "
        "with fewer PQ bytes per key (IVF…,PQ<m> with smaller m); a Flat index holds N × d × 4 bytes."
    )
    where = "GPU build, index copied back" if use_gpu else "in RAM"
    check_fits(needed, available_ram(), f"building {plan.factory} ({where}: index + training sample)", fix)


def check_recall_k(recall_queries: int, recall_k: int) -> None:
    """The recall measured after the build needs k ≥ 1; refused before the build, not after it."""
    if recall_queries > 0 and recall_k < 1:
        raise ValueError(f"--recall_k must be 1 or more, got {recall_k}; or pass --recall_queries 0 to skip recall.")


def describe_recall(recall: dict) -> str:
    return f"recall@{recall['k']} against exact search on {recall['queries']} stored keys: {recall['recall']:.4f}"


def measured_recall(index, store: Datastore, queries: int, k: int, seed: int) -> dict:
    """recall@k of ``index`` against exact search (torch, blocked) for ``queries`` stored keys drawn at random."""
    from lightning_memdec.retrieval.exact_search import exact_search

    n = len(store)
    k = min(k, n)
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, size=min(queries, n), replace=False))
    q = np.asarray(gather_rows(store.keys, rows), dtype=np.float32)
    _, found = index.search(q, k)
    _, truth = exact_search(q, store.keys, k)
    truth = truth.numpy()
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return {"k": k, "queries": len(rows), "recall": hits / (len(rows) * k)}


class KeyIndex:
    """A built index directory, loaded for search: a FAISS index on the host (optionally moved to one GPU,
    ``device``, or to all of them, by a faiss GPU build), or a cuVS index on GPU ``device`` (default: the current)."""

    def __init__(
        self, directory: str | Path, use_gpu: bool = False, nprobe: int | None = None, device: int | None = None
    ):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir, kind="index")
        self.library = self.meta.get("library", "faiss")  # indexes built before cuVS support are FAISS's
        path = self.dir / (CUVS_INDEX if self.library == "cuvs" else INDEX)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the index.")
        if self.library == "cuvs":
            index = CuvsIVFPQ.load(path, self.meta["factory"], cuvs_index.cuvs_device(device), self.meta["nprobe"])
        else:
            index = faiss.read_index(str(path))
        if index.ntotal != self.meta["ntotal"] or index.d != self.meta["dim"]:
            raise ArtifactError(
                f"{path} holds {index.ntotal}×{index.d} keys but meta.json says "
                f"{self.meta['ntotal']}×{self.meta['dim']}; rebuild it."
            )
        self.index = to_gpu(index, device) if use_gpu and self.library == "faiss" else index
        set_nprobe(self.index, nprobe or self.meta["nprobe"])
        #: where search_tensors returns its results: a cuVS index's GPU; the host for FAISS (whose GPU search
        #: takes and returns host arrays)
        self.device = index.device if self.library == "cuvs" else torch.device("cpu")

    def check_datastore(self, store: Datastore) -> None:
        check_index_matches(self.dir, self.meta, store)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared-L2 distances [n, k] float32 and ids [n, k] int64 (-1 where fewer than k exist), on the host."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def search_tensors(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`search`, tensors in and out, the results on :attr:`device`: a cuVS index reads the queries and
        writes its results on its GPU (nothing visits the host); FAISS searches a host copy of the queries."""
        if self.library == "cuvs":
            return self.index.search_tensors(queries, k)
        dist, ids = self.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(dist), torch.from_numpy(ids)
