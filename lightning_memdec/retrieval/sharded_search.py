"""Exact search with the keys sharded over ranks, for stores whose keys do not fit one rank.

Rank r of R keeps keys [r·N/R, (r+1)·N/R) only, searches every query against them (:func:`shard_search`: the exact
top-k of its shard, found with :func:`~retrieval.exact_search.exact_search`'s own re-ranking margin, so each
shard's k candidates carry exact fp32 distances), the ranks all-gather their candidates, and :func:`merge_shards`
keeps the best k of the R·k. The global k nearest are among the union of each shard's k nearest, and the merge orders
by (distance, id) as the unsharded search does, so the result equals the unsharded one, ties aside.
"""

from __future__ import annotations

import torch

from lightning_memdec.retrieval.exact_search import by_distance_then_id, exact_search


def key_shard(num_keys: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [lo, hi) rows of the keys rank ``rank`` keeps: contiguous, sizes differing by at most one."""
    return num_keys * rank // world_size, num_keys * (rank + 1) // world_size


def check_shards_hold_k(num_keys: int, world_size: int, k: int, self_exclude: bool) -> None:
    """Each shard must hold k candidates (k + 1 when a query's own key may fall in it), checked before any search."""
    smallest = num_keys // world_size
    need = k + (1 if self_exclude else 0)
    if smallest < need:
        raise ValueError(
            f"shard_keys: {world_size} ranks leave {smallest} keys of {num_keys} on the smallest shard, fewer than the "
            f"{need} candidates each must return (k={k}); use fewer ranks, a smaller k, or shard_keys=false."
        )


def shard_search(
    queries,
    shard_keys,
    lo: int,
    k: int,
    query_ids=None,
    device="cpu",
    memory_bytes=None,
    key_norms=None,
    selection="auto",
):
    """The exact k nearest of ``shard_keys`` (rows ``lo`` onwards of the store) for every query, with store ids.

    ``query_ids``: each query's own store id, excluded where it falls inside this shard; ``selection``: as
    :func:`~retrieval.exact_search.exact_search`'s.
    Returns (distances [n, k] float32, store ids [n, k] int64) on ``device``.
    """
    own = None if query_ids is None else torch.as_tensor(query_ids, dtype=torch.int64) - lo
    dist, ids = exact_search(
        queries, shard_keys, k, own, device, memory_bytes, key_norms=key_norms, selection=selection
    )
    return dist, ids + lo


def merge_shards(dist: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of all shards' candidates: ``dist``, ``ids`` [R, n, c] (from an all-gather) -> [n, k] each,
    rows sorted by (distance, id) like :func:`~retrieval.exact_search.exact_search`."""
    n = dist.shape[1]
    dist, ids = by_distance_then_id(dist.permute(1, 0, 2).reshape(n, -1), ids.permute(1, 0, 2).reshape(n, -1))
    return dist[:, :k], ids[:, :k]
