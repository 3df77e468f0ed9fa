"""Exact search's candidates from cuVS's brute-force k-NN, over keys resident on a GPU (``selection="cuvs"``).

Why: on a GPU, exact_search's own selection is one ``torch.topk`` a key block over its fp32 scores (99 ms of a
4,096-query call over 2 M keys on an H200, beside 110 ms of products). cuVS's brute force tiles the same products
and selects each tile's best with its radix ``select_k``, the library route issue 20 names for exact search. Its
distances come from products in the keys' dtype (fp16 from a datastore), so, as with exact_search's other selections,
its ``k + margin`` candidates go to the exact fp32 re-ranking: the same neighbours as ``topk``'s, ties aside.

cuVS keeps a reference to the keys, not a copy; the index (the keys' norms) is made for each call, on torch's
current stream, so nothing waits on the host and nothing outlives the call.
"""

from __future__ import annotations

import torch

from lightning_memdec.retrieval import cuvs_index


def brute_force_api():
    """cuVS's brute-force module and its resource handle class, or an error that says how to get them."""
    try:
        from cuvs.common import Resources
        from cuvs.neighbors import brute_force
    except ImportError as err:
        raise ImportError(
            "--search.selection cuvs needs cuVS on a CUDA 13 machine: pip install -e '.[gpu]' (cuvs-cu13); or use "
            "--search.selection topk or threshold, which need only torch."
        ) from err
    return brute_force, Resources


def check_brute_force_keys(keys, device: torch.device) -> None:
    """Refuse keys cuVS cannot search in place: it reads a matrix on the search's GPU, not one streamed from disk."""
    if not isinstance(keys, torch.Tensor) or keys.device != device:
        where = "a file on the host" if not isinstance(keys, torch.Tensor) else f"a tensor on {keys.device}"
        raise ValueError(
            f"selection 'cuvs' searches keys resident on the search's device ({device}); these are {where}. Keys "
            "that do not fit 40% of the GPU's free memory are streamed: use selection 'topk' or 'threshold' for them."
        )
    if keys.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"selection 'cuvs' searches fp16 or fp32 keys, got {keys.dtype}.")


def brute_force_candidates(
    queries: torch.Tensor, keys: torch.Tensor, own: torch.Tensor | None, candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [n, c] float32 as cuVS ranks them, ids [n, c] int64) of the ``c = candidates`` nearest keys of each
    query other than its own key ``own`` [n] (by id; ``None``: none excluded), on the keys' GPU, where ``queries``
    [n, d] must be too; they are cast to the keys' dtype (cuVS multiplies like with like). With ``own``, c + 1 must
    not exceed the keys."""
    brute_force, resources_class = brute_force_api()
    check_brute_force_keys(keys, queries.device)
    device = cuvs_index.cuvs_device(keys.device)
    searched = candidates if own is None else candidates + 1  # the own key, then dropped, is among the nearest
    q = queries.to(device, keys.dtype).contiguous()
    dist = torch.empty(len(q), searched, dtype=torch.float32, device=device)
    ids = torch.empty(len(q), searched, dtype=torch.int64, device=device)
    resources = cuvs_index.stream_resources(resources_class, device)
    with cuvs_index.device_scope(device):
        index = brute_force.build(keys.contiguous(), metric="sqeuclidean", resources=resources)
        brute_force.search(index, q, searched, neighbors=ids, distances=dist, resources=resources)
    if own is None:
        return dist, ids
    # the own key out, wherever cuVS put it (ties with a copy of it), else the farthest: the first c of the rest
    keep = (ids == own.to(device)[:, None]).to(torch.int8).argsort(dim=1, stable=True)[:, :candidates]
    return dist.gather(1, keep), ids.gather(1, keep)
