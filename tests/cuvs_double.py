"""A stand-in for cuVS's Python IVF-PQ and brute-force APIs (``cuvs.neighbors.ivf_pq``, ``cuvs.neighbors.brute_force``,
``cuvs.common.Resources``) on the CPU.

It follows cuVS 26.10's documented signatures and input checks (dtypes, output shapes, keyword-only parameters,
``len(index)``, ``index.dim``, the largest int64 for a slot it could not fill) but IVF-PQ searches **exactly** (squared
L2 only), and brute force ranks by its metric (squared L2 by the expanded form ‖q‖² + ‖k‖² − 2 q·k in fp32 as cuVS's
does, so near ties may swap) and views the dataset without owning it, so a test can compare the package's cuVS code
path (build, extend by batches, search into preallocated tensors, save/load, the targets and kNN-LM wiring) with brute
force on a machine without a GPU. It says nothing about cuVS's own accuracy or speed: those are measured on a GPU
(benchmarks/gpu.py).
"""

from __future__ import annotations

import sys
import types
import weakref

import numpy as np
import torch

UNFILLED = np.iinfo(np.int64).max  # cuVS's kOutOfBoundsRecord for an int64 index


def as_tensor(array, dtypes: tuple[torch.dtype, ...], what: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array
    elif hasattr(array, "__array_interface__"):
        tensor = torch.from_numpy(np.asarray(array))
    else:  # the real wrap_array: a CUDA array interface or an array interface, nothing else
        raise AttributeError(f"{type(array).__name__} has neither __cuda_array_interface__ nor __array_interface__")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{what}: dtype {tensor.dtype} is not supported")
    return tensor


class Resources:
    def __init__(self, stream=None):
        self.stream = stream
        self.syncs = 0

    def sync(self):
        self.syncs += 1


class IndexParams:
    def __init__(self, n_lists=1024, *, metric="sqeuclidean", metric_arg=2.0, kmeans_n_iters=20,
                 kmeans_trainset_fraction=0.5, pq_bits=8, pq_dim=0, codebook_kind="subspace",
                 force_random_rotation=False, add_data_on_build=True, conservative_memory_allocation=False,
                 max_train_points_per_pq_code=256, codes_layout="interleaved"):  # fmt: skip
        if metric not in ("sqeuclidean", "inner_product", "euclidean", "cosine"):
            raise ValueError(f"metric {metric!r}")
        if (pq_dim * pq_bits) % 8:
            raise ValueError("pq_dim * pq_bits must be a multiple of 8")
        self.n_lists, self.metric, self.pq_bits, self.pq_dim = n_lists, metric, pq_bits, pq_dim
        self.kmeans_trainset_fraction, self.add_data_on_build = kmeans_trainset_fraction, add_data_on_build


class SearchParams:
    def __init__(self, n_probes=20, *, lut_dtype=np.float32, internal_distance_dtype=np.float32,
                 coarse_search_dtype=np.float32, max_internal_batch_size=4096):  # fmt: skip
        self.n_probes = n_probes


class Index:
    def __init__(self, dim: int, params: IndexParams):
        self.dim, self.params, self.trained = dim, params, True
        self.vectors = torch.zeros(0, dim)
        self.ids = torch.zeros(0, dtype=torch.int64)

    def __len__(self):
        return len(self.ids)


DATA_DTYPES = (torch.float32, torch.float16, torch.int8, torch.uint8)


def build(index_params, dataset, resources=None):
    data = as_tensor(dataset, DATA_DTYPES, "dataset")
    if len(data) < index_params.n_lists:
        raise RuntimeError(f"{len(data)} training rows for {index_params.n_lists} lists")
    index = Index(data.shape[1], index_params)
    index.trained_on = len(data)
    if index_params.add_data_on_build:
        extend(index, data, torch.arange(len(data)))
    return index


def extend(index, new_vectors, new_indices, resources=None):
    vectors = as_tensor(new_vectors, DATA_DTYPES, "new_vectors")
    ids = as_tensor(new_indices, (torch.int64,), "new_indices")
    if ids.shape != (len(vectors),) or vectors.shape[1] != index.dim:
        raise ValueError(f"extend: {tuple(vectors.shape)} vectors with {tuple(ids.shape)} ids for dim {index.dim}")
    index.vectors = torch.cat([index.vectors, vectors.float().cpu()])
    index.ids = torch.cat([index.ids, ids.cpu()])
    return index


def search_outputs(n: int, k: int, neighbors, distances) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids [n, k] int64 and distances [n, k] float32 a search writes: those given (checked as cuVS checks
    them), else new ones."""
    neighbors = torch.empty(n, k, dtype=torch.int64) if neighbors is None else neighbors
    distances = torch.empty(n, k, dtype=torch.float32) if distances is None else distances
    for out, dtype in ((neighbors, torch.int64), (distances, torch.float32)):
        if as_tensor(out, (dtype,), "output").shape != (n, k):
            raise ValueError(f"output of shape {tuple(out.shape)}, expected {(n, k)}")
    return neighbors, distances


def search(search_params, index, queries, k, neighbors=None, distances=None, resources=None):
    if index.params.metric != "sqeuclidean":
        raise NotImplementedError(f"the double's IVF-PQ ranks by sqeuclidean only, not {index.params.metric!r}")
    q = as_tensor(queries, DATA_DTYPES, "queries").float()
    neighbors, distances = search_outputs(len(q), k, neighbors, distances)
    d = torch.cdist(q.double().cpu(), index.vectors.double()).square()  # exact, float64
    found = min(k, len(index))
    best, cols = d.topk(found, dim=1, largest=False)
    distances[:, :found] = best.float().to(distances.device)
    neighbors[:, :found] = index.ids[cols].to(neighbors.device)
    distances[:, found:] = float("inf")
    neighbors[:, found:] = UNFILLED
    return distances, neighbors


def save(filename, index, include_dataset=True, resources=None):
    with open(filename, "wb") as f:
        np.savez(f, vectors=index.vectors.numpy(), ids=index.ids.numpy(), n_lists=index.params.n_lists,
                 pq_dim=index.params.pq_dim, trained_on=index.trained_on)  # fmt: skip


def load(filename, resources=None):
    with np.load(filename, allow_pickle=False) as f:
        index = Index(f["vectors"].shape[1], IndexParams(int(f["n_lists"]), pq_dim=int(f["pq_dim"])))
        index.vectors, index.ids = torch.from_numpy(f["vectors"]), torch.from_numpy(f["ids"])
        index.trained_on = int(f["trained_on"])
    return index


class BruteForceIndex:
    """cuVS's brute-force index: the dataset's squared norms and a view of the dataset, which it does not own (the
    C++ index holds a non-owning view): here a weak reference, so a search after the caller freed it fails, where
    the real one would read freed memory."""

    def __init__(self, dataset: torch.Tensor, metric: str):
        self.dataset_ref, self.metric, self.trained = weakref.ref(dataset), metric, True
        self.norms = dataset.float().square().sum(1)

    @property
    def dataset(self) -> torch.Tensor:
        dataset = self.dataset_ref()
        if dataset is None:
            raise RuntimeError("the dataset this brute-force index views was freed: cuVS's index does not own it")
        return dataset


def brute_force_build(dataset, metric="sqeuclidean", metric_arg=2.0, resources=None):
    data = as_tensor(dataset, (torch.float32, torch.float16), "dataset")
    if metric not in ("sqeuclidean", "euclidean", "inner_product", "cosine"):
        raise ValueError(f"metric {metric!r}")
    if metric == "cosine":
        raise NotImplementedError("the double ranks by sqeuclidean, euclidean and inner_product only")
    return BruteForceIndex(data, metric)


def brute_force_search(index, queries, k, neighbors=None, distances=None, resources=None, prefilter=None):
    """The k best keys by the index's metric: the smallest distances (L2Expanded in fp32, as cuVS computes them) or,
    for ``inner_product``, the largest products."""
    if not index.trained:
        raise ValueError("Index needs to be built before calling search.")
    q = as_tensor(queries, (torch.float32, torch.float16), "queries")
    if q.dtype != index.dataset.dtype:  # the C API reads both as one element type
        raise RuntimeError(f"queries of dtype {q.dtype} for an index of {index.dataset.dtype}")
    neighbors, distances = search_outputs(len(q), k, neighbors, distances)
    qf, kf = q.float(), index.dataset.float()
    products = qf @ kf.T
    if index.metric == "inner_product":
        d = products
    else:
        d = qf.square().sum(1, keepdim=True) + index.norms - 2 * products  # L2Expanded, in fp32
        d = d.clamp(min=0).sqrt() if index.metric == "euclidean" else d
    found = min(k, len(kf))
    best, cols = d.topk(found, dim=1, largest=index.metric == "inner_product")
    distances[:, :found], neighbors[:, :found] = best, cols
    distances[:, found:], neighbors[:, found:] = torch.finfo(torch.float32).min, -1  # as cuVS fills n < k
    return distances, neighbors


def described(value):
    """A tensor as its shape and dtype, anything else as it is: a record that keeps no tensor alive."""
    return f"tensor{tuple(value.shape)}:{value.dtype}" if isinstance(value, torch.Tensor) else value


def recorded(calls: list, name: str, function):
    """``function``, each call appended to ``calls`` as (name, args, kwargs), tensors described: what the package
    passed, to bind against the real cuVS's signatures where it is installed."""

    def call(*args, **kwargs):
        calls.append((name, tuple(map(described, args)), {key: described(v) for key, v in kwargs.items()}))
        return function(*args, **kwargs)

    return call


def install(monkeypatch) -> types.ModuleType:
    """Make ``import cuvs.neighbors.ivf_pq`` / ``.brute_force`` / ``cuvs.common`` give this double for one test;
    returns ivf_pq. ``brute_force.calls`` records the brute-force calls made."""
    ivf_pq = types.ModuleType("cuvs.neighbors.ivf_pq")
    for name in ("IndexParams", "SearchParams", "Index", "build", "extend", "search", "save", "load"):
        setattr(ivf_pq, name, globals()[name])
    brute_force = types.ModuleType("cuvs.neighbors.brute_force")
    brute_force.calls = []
    brute_force.Index = BruteForceIndex
    brute_force.build = recorded(brute_force.calls, "build", brute_force_build)
    brute_force.search = recorded(brute_force.calls, "search", brute_force_search)
    common = types.ModuleType("cuvs.common")
    common.Resources = Resources
    neighbors = types.ModuleType("cuvs.neighbors")
    neighbors.ivf_pq, neighbors.brute_force = ivf_pq, brute_force
    root = types.ModuleType("cuvs")
    root.neighbors, root.common = neighbors, common
    for name, module in (("cuvs", root), ("cuvs.common", common), ("cuvs.neighbors", neighbors),
                         ("cuvs.neighbors.ivf_pq", ivf_pq), ("cuvs.neighbors.brute_force", brute_force)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return ivf_pq
