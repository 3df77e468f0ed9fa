"""With an IVF-PQ index the searched distances are PQ's approximations; ``exact_distances`` replaces them by
Σ (q − k_id)² over the ids FAISS returned, in build-targets' rows and in KNNLM's neighbours. A Flat index, whose
distances are exact already, cannot tell whether it did."""

import numpy as np
import pytest
import torch

from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.retrieval.faiss_index import KeyIndex, build_index
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory, biomed_datastore):
    out = tmp_path_factory.mktemp("pq") / "pq"
    return build_index(biomed_datastore, out, plan=IndexSettings(factory="IVF16,PQ8", nprobe=16))


def squared_distances(keys: np.ndarray, query: np.ndarray, ids) -> np.ndarray:
    return ((keys[ids].astype(np.float64) - query.astype(np.float64)) ** 2).sum(-1)


def test_knnlm_neighbours_take_exact_distances_over_the_pq_ids(tiny_gpt2, biomed_datastore, pq_index):
    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    queries = keys[::97].copy()
    pq_dist, ids = KeyIndex(pq_index).search(queries, 8)
    exact = np.stack([squared_distances(keys, q, row) for q, row in zip(queries, ids)])
    assert np.abs(pq_dist - exact).max() > 1e-2 * exact.max()  # PQ's distances are approximate here
    for exact_distances, want in ((True, exact), (False, pq_dist)):
        lm = KNNLM(tiny_gpt2, biomed_datastore, pq_index, k=8, temperature=4.0, lmbda=0.5,
                   exact_distances=exact_distances)  # fmt: skip
        dist, _ = lm.neighbours(torch.from_numpy(queries))
        np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)


def test_targets_take_exact_distances_over_the_pq_ids(tmp_path, biomed_datastore, pq_index):
    store = Datastore(biomed_datastore)
    keys, temperature = np.asarray(store.keys, dtype=np.float32), 4.0
    knn = KNNTargets(k=8, temperature=temperature, exact_distances=True)
    search = TargetSearch(backend="faiss", chunk_size=512)
    targets = Targets(build_targets(biomed_datastore, pq_index, tmp_path / "t", knn=knn, search=search))
    rows = [0, 700, 1500, len(store) - 1]
    _, ids = KeyIndex(pq_index).search(keys[rows], 9)  # k + 1: the query's own entry is among them, or the farthest
    for q, found in zip(rows, ids):
        nearest = [int(i) for i in found if i != q][:8]
        d = squared_distances(keys, keys[q], nearest)
        weights = np.exp(-(d - d.min()) / temperature)
        want: dict[int, float] = {}
        for j, w in zip(nearest, weights / weights.sum()):
            want[int(store.values[j])] = want.get(int(store.values[j]), 0.0) + w
        got_ids, got_probs = targets.row(q)
        got = dict(zip(got_ids.tolist(), got_probs.astype(np.float64).tolist()))
        assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 2e-3 for t in want), q
