"""cuVS IVF-PQ indexes: trained, filled and searched on a GPU, torch CUDA tensors passed in place.

cuVS (``pip install -e ".[gpu]"``: ``cuvs-cu13``, module ``cuvs``) is the GPU search library whose CUDA 13 wheels
install beside torch and faiss-cpu (docs/gpu.md). ``memdec build-index --library cuvs`` writes ``index.cuvs`` (cuVS's
own serialisation) where FAISS writes ``index.faiss``; the plan (IVF lists, PQ bytes per key, nprobe), the training
sample, meta.json and the recall check are the FAISS path's. Such an index is searched on a GPU only.

:class:`CuvsIVFPQ` offers the part of ``faiss.Index`` the build and the recall check use (``train``, ``add``,
``search`` on host arrays, ``ntotal``, ``d``) plus :meth:`CuvsIVFPQ.search_tensors`, which reads queries and writes
distances and ids as torch tensors on the index's GPU, on torch's current stream (no host copy, no host sync).
A neighbour cuVS could not fill (fewer than k keys in the probed lists) comes back as id −1, distance +inf, as
FAISS reports it.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

CUVS_INDEX = "index.cuvs"  # in an index directory built with --library cuvs, beside its meta.json
PQ_BITS = 8  # one code byte per sub-quantizer, as FAISS's PQ<m>


def cuvs_api():
    """cuVS's IVF-PQ module and its resource handle class, or an error that says how to get them."""
    try:
        from cuvs.common import Resources
        from cuvs.neighbors import ivf_pq
    except ImportError as err:
        raise ImportError(
            "--library cuvs needs cuVS on a CUDA 13 machine: pip install -e '.[gpu]' (cuvs-cu13); or build a FAISS "
            "index (--library faiss), or search a GPU without an index (--search.backend exact)."
        ) from err
    return ivf_pq, Resources


def cuvs_device(device: torch.device | int | None = None) -> torch.device:
    """The CUDA device a cuVS index lives on (``None``: the current one); refused where there is no GPU."""
    if not torch.cuda.is_available():
        raise ValueError(
            "a cuVS index is built and searched on a GPU, and no CUDA device is visible here; build a FAISS index "
            "(--library faiss) to search on the CPU."
        )
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"cuVS reads GPU memory, and these tensors are on {device}: move them to a CUDA device.")
        return device
    return torch.device("cuda", torch.cuda.current_device() if device is None else device)


def ivf_pq_shape(factory: str) -> tuple[int, int]:
    """(lists, PQ bytes per key) of an ``IVF<lists>,PQ<m>`` factory string: the one layout cuVS's IVF-PQ builds."""
    match = re.fullmatch(r"IVF(\d+),PQ(\d+)(?:x8)?", factory)
    if match is None:
        raise ValueError(
            f"--library cuvs builds IVF-PQ indexes (factory IVF<lists>,PQ<bytes>), not {factory!r}; give such a "
            "--plan.factory, or --library faiss. A store small enough for a Flat plan is searched exactly on a GPU "
            "without any index (build-targets --search.backend exact, KNNLM(search='exact'))."
        )
    return int(match[1]), int(match[2])


class CuvsIVFPQ:
    """A cuVS IVF-PQ index over ``d``-dim keys on one device, ids assigned in the order keys are added."""

    def __init__(self, d: int, factory: str, device: torch.device, nprobe: int = 32, index=None):
        self.ivf_pq, self.resource_class = cuvs_api()
        self.d, self.factory, self.device, self.nprobe = d, factory, torch.device(device), nprobe
        self.nlist, self.pq_m = ivf_pq_shape(factory)
        self.index = index  # cuVS's Index once trained (or loaded)
        self.ntotal = 0 if index is None else len(index)
        self.resources = {}  # one cuVS handle per torch stream it orders work on

    @classmethod
    def load(cls, path: Path, factory: str, device: torch.device, nprobe: int) -> CuvsIVFPQ:
        ivf_pq, _ = cuvs_api()
        with device_scope(device):
            index = ivf_pq.load(str(path))
        return cls(index.dim, factory, device, nprobe, index=index)

    @property
    def is_trained(self) -> bool:
        return self.index is not None

    def handle(self):
        """cuVS resources on torch's current stream of this device: cuVS reads what torch wrote before and torch
        reads what cuVS wrote after, in stream order, with no host synchronisation."""
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        if stream not in self.resources:
            self.resources[stream] = stream_resources(self.resource_class, self.device)
        return self.resources[stream]

    def index_params(self):
        """The plan's layout in cuVS's terms: ``nlist`` lists, ``m`` one-byte codes per key, squared L2."""
        return self.ivf_pq.IndexParams(
            n_lists=self.nlist,
            metric="sqeuclidean",
            pq_bits=PQ_BITS,
            pq_dim=self.pq_m,
            kmeans_trainset_fraction=1.0,  # the sample is already the plan's training sample
            add_data_on_build=False,  # keys are added in batches, with their datastore rows as ids
        )

    def search_params(self):
        return self.ivf_pq.SearchParams(n_probes=self.nprobe)

    def train(self, sample: np.ndarray | torch.Tensor) -> None:
        """The coarse quantizer's ``nlist`` centroids and the PQ codebooks, from ``sample`` [n, d] (all of it)."""
        with device_scope(self.device):
            self.index = self.ivf_pq.build(self.index_params(), self.on_device(sample), resources=self.handle())
        self.ntotal = 0

    def add(self, keys: np.ndarray | torch.Tensor) -> None:
        """Encode ``keys`` [n, d] into the lists, with ids ``ntotal … ntotal + n − 1`` (datastore rows)."""
        ids = torch.arange(self.ntotal, self.ntotal + len(keys), dtype=torch.int64, device=self.device)
        with device_scope(self.device):
            self.index = self.ivf_pq.extend(self.index, self.on_device(keys), ids, resources=self.handle())
        self.ntotal += len(keys)

    def search_tensors(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared-L2 distances [n, k] float32 (PQ-approximate) and ids [n, k] int64 (−1, +inf where none), on the
        index's device; queries on another device are moved there first."""
        queries = queries.detach().to(self.device, torch.float32).contiguous()
        dist = torch.empty(len(queries), k, dtype=torch.float32, device=self.device)
        ids = torch.empty(len(queries), k, dtype=torch.int64, device=self.device)
        with device_scope(self.device):
            self.ivf_pq.search(self.search_params(), self.index, queries, k, neighbors=ids, distances=dist,
                               resources=self.handle())  # fmt: skip
        missing = (ids < 0) | (ids >= self.ntotal)  # cuVS marks an unfilled slot with the largest int64
        return dist.masked_fill_(missing, float("inf")), ids.masked_fill_(missing, -1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``faiss.Index.search``: host arrays in and out (the recall check)."""
        dist, ids = self.search_tensors(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), k)
        return dist.cpu().numpy(), ids.cpu().numpy()

    def save(self, path: Path) -> None:
        self.handle().sync()  # the index must be complete before it is serialised
        with device_scope(self.device):
            self.ivf_pq.save(str(path), self.index)

    def on_device(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Host rows or a tensor anywhere, as contiguous float32 on the index's device (copied only if needed)."""
        rows = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))
        return rows.to(self.device, torch.float32).contiguous()


def stream_resources(resource_class, device: torch.device):
    """A cuVS resource handle (``resource_class``: ``cuvs.common.Resources``) on torch's current stream of ``device``:
    cuVS then orders its work after what torch wrote and before what torch reads next, with no host wait."""
    if device.type != "cuda":
        return resource_class()
    return resource_class(stream=torch.cuda.current_stream(device).cuda_stream)


def device_scope(device: torch.device):
    """cuVS works on the current CUDA device: make it ``device`` for the call."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
