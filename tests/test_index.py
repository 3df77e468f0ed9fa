import numpy as np
import pytest

from lightning_memdec.artifacts import ArtifactError
from lightning_memdec.datastore import Datastore
from lightning_memdec.index import KeyIndex, auto_factory, build_index


def brute_force(keys, queries, k):
    d = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def test_flat_index_equals_brute_force(biomed_datastore, biomed_index):
    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    queries = keys[::97]
    dist, ids = KeyIndex(biomed_index).search(queries, 8)
    ref_d, _ = brute_force(keys, queries, 8)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    # ids agree up to exact distance ties: the distance of each returned id is the true one
    true = ((queries[:, None, :] - keys[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-3)
    assert KeyIndex(biomed_index).meta["ntotal"] == len(keys)


def test_ivf_with_all_lists_probed_is_exact_and_pq_recalls(tmp_path, biomed_datastore):
    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    queries = keys[::61]
    _, ref_ids = brute_force(keys, queries, 10)
    ivf = KeyIndex(build_index(biomed_datastore, tmp_path / "ivf", factory="IVF16,Flat", nprobe=16))
    dist, ids = ivf.search(queries, 10)
    ref_d, _ = brute_force(keys, queries, 10)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    pq = KeyIndex(build_index(biomed_datastore, tmp_path / "pq", factory="IVF16,PQ8", nprobe=16))
    _, pq_ids = pq.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_ids, ref_ids)])
    assert recall > 0.5, recall
    assert pq.meta["factory"] == "IVF16,PQ8" and pq.meta["nprobe"] == 16


def test_auto_factory_by_size():
    assert auto_factory(10_000, 768) == "Flat"
    assert auto_factory(1_000_000, 768) == "IVF4096,PQ64"
    assert auto_factory(100_000_000, 896) == "IVF32768,PQ64"
    assert auto_factory(1_000_000, 100) == "IVF4096,PQ50"


def test_bad_factory_and_existing_output(tmp_path, biomed_datastore, biomed_index):
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        build_index(biomed_datastore, tmp_path / "x", factory="NotAnIndex")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArtifactError, match="already exists"):
        build_index(biomed_datastore, biomed_index, factory="Flat")
    with pytest.raises(ArtifactError, match="does not exist"):
        build_index(tmp_path / "missing", tmp_path / "y")


def test_exact_distances_in_bounded_blocks_equal_one_pass():
    from lightning_memdec.index import exact_squared_l2

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((50, 8)).astype(np.float16)
    queries = rng.standard_normal((13, 8)).astype(np.float32)
    ids = rng.integers(-1, 50, size=(13, 6))
    whole = exact_squared_l2(queries, keys, ids)
    blocked = exact_squared_l2(queries, keys, ids, memory_bytes=2 * 6 * 8 * 4 * 3)  # 3 queries per block
    np.testing.assert_array_equal(whole, blocked)
    want = ((keys.astype(np.float32)[np.maximum(ids, 0)] - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(whole, np.where(ids >= 0, want, np.inf), rtol=1e-6)
