"""The cuVS code path (``build-index --library cuvs``, its search in targets and kNN-LM) on the CPU, through a
stand-in for cuVS's API that searches exactly (tests/cuvs_double.py): the package's glue against brute force. What
cuVS itself does on a GPU (IVF-PQ accuracy, speed) is measured by benchmarks/gpu.py, not here."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from cuvs_double import install
from test_evaluate import brute_force_knn, test_tokens  # noqa: F401 (a fixture)
from test_targets import brute_force_row

from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.io.readers import INDEX, Datastore, Targets
from lightning_memdec.retrieval import cuvs_index
from lightning_memdec.retrieval.cuvs_index import CUVS_INDEX, CuvsIVFPQ, ivf_pq_shape
from lightning_memdec.retrieval.faiss_index import KeyIndex, build_index
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.target_searcher import nearest_without_own
from lightning_memdec.stages.targets import build_targets

PLAN = IndexSettings(factory="IVF16,PQ8", nprobe=16, train_size=1000)


def test_built_index_searches_like_brute_force_and_reports_missing_neighbours(tmp_path, biomed_datastore, cuvs):
    out = build_index(biomed_datastore, tmp_path / "idx", plan=PLAN, library="cuvs", add_batch=700, recall_queries=64)
    meta = json.loads((out / "meta.json").read_text())
    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    assert meta["library"] == "cuvs" and meta["factory"] == "IVF16,PQ8" and meta["ntotal"] == len(keys)
    assert (out / CUVS_INDEX).is_file() and not (out / INDEX).exists()
    assert meta["recall"]["recall"] == 1.0  # the double searches exactly: the recall check read the right ids
    index = KeyIndex(out)
    assert index.library == "cuvs" and index.index.nprobe == 16 and len(index.index.index) == len(keys)
    assert index.index.index.trained_on == 1000  # trained on the plan's sample, the keys added after, in batches
    queries = keys[::97]
    d = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    dist, ids = index.search_tensors(torch.from_numpy(queries), 8)
    assert dist.dtype == torch.float32 and ids.dtype == torch.int64 and dist.device == index.device
    np.testing.assert_allclose(dist.numpy(), np.sort(d, axis=1)[:, :8], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.take_along_axis(d, ids.numpy(), 1), dist.numpy(), rtol=1e-4, atol=1e-3)
    # more neighbours than keys: the slots cuVS leaves unfilled come back as FAISS reports them
    dist, ids = index.search(queries[:2], len(keys) + 3)
    assert (ids[:, -3:] == -1).all() and np.isinf(dist[:, -3:]).all() and (ids[:, :-3] >= 0).all()


def test_targets_from_a_cuvs_index_equal_brute_force(tmp_path, biomed_datastore, cuvs):
    index = build_index(biomed_datastore, tmp_path / "idx", plan=PLAN, library="cuvs", recall_queries=0)
    knn = KNNTargets(k=16, temperature=4.0, exact_distances=True)
    out = build_targets(biomed_datastore, index, tmp_path / "t", knn=knn, search=TargetSearch(backend="faiss"))
    store, targets = Datastore(biomed_datastore), Targets(out)
    keys = np.asarray(store.keys, dtype=np.float32)
    assert targets.meta["self_excluded"] and len(targets) == len(store) and targets.meta["index_library"] == "cuvs"
    for q in [0, 1, 500, 1234, len(store) - 1]:
        ids, probs = targets.row(q)
        ref = brute_force_row(keys, store.values, q, 16, 4.0, exclude=q)
        got = dict(zip(ids.tolist(), probs.astype(np.float64).tolist()))
        assert set(got) == set(ref), (q, got, ref)
        for tok in ref:
            assert got[tok] == pytest.approx(ref[tok], abs=2e-3)


@pytest.mark.parametrize("k, exact", [(8, False), (40, True)])
def test_knnlm_over_a_cuvs_index_equals_brute_force(tmp_path, tiny_gpt2, biomed_datastore, test_tokens, cuvs, k, exact):  # noqa: F811
    index = build_index(biomed_datastore, tmp_path / "idx", plan=PLAN, library="cuvs", recall_queries=0)
    lm = KNNLM(tiny_gpt2, biomed_datastore, index, k=k, temperature=4.0, lmbda=0.5, exact_distances=exact)
    _, keys = lm.base_forward(torch.as_tensor(test_tokens[:24])[None])
    expected = brute_force_knn(Datastore(biomed_datastore), keys[0].numpy(), k, 4.0)
    np.testing.assert_allclose(lm.knn_log_probs(keys[0]).double().exp().numpy(), expected, rtol=1e-4, atol=1e-7)


def test_index_takes_tensors_where_they_are(cuvs):
    """Keys already on the device (benchmarks/gpu.py's synthetic stores) are trained on and added without a host
    round trip; ids follow the order of the batches."""
    keys = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).half()
    index = CuvsIVFPQ(16, "IVF4,PQ4", torch.device("cpu"), nprobe=4)
    index.train(keys[::3])
    for start in range(0, 300, 128):
        index.add(keys[start : start + 128])
    dist, ids = index.search_tensors(keys[:5], 3)
    exact = torch.cdist(keys[:5].float(), keys.float()).square()
    assert index.ntotal == 300 and ids[:, 0].tolist() == list(range(5))
    torch.testing.assert_close(dist, exact.topk(3, largest=False).values, rtol=1e-4, atol=1e-3)


def test_own_entry_dropped_wherever_it_sits():
    dist = torch.tensor([[0.0, 1.0, 1.0, 3.0], [2.0, 0.5, 0.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([[7, 3, 4, 5], [1, 2, 8, 6], [0, 1, -1, 2]])
    own = torch.tensor([7, 8, 9])  # first column, third column, absent
    d, i = nearest_without_own(dist, ids, own, 3)
    assert i.tolist() == [[3, 4, 5], [2, 1, 6], [0, 1, -1]]  # ties keep column order; the rest by distance
    assert d.tolist() == [[1.0, 1.0, 3.0], [0.5, 2.0, 9.0], [1.0, 2.0, 3.0]]


def test_refused_before_any_work(tmp_path, biomed_datastore, monkeypatch):
    out = tmp_path / "idx"
    with pytest.raises(ValueError, match="--library must be one of"):
        build_index(biomed_datastore, out, plan=PLAN, library="annoy")
    with pytest.raises(ValueError, match="drop --use_gpu"):
        build_index(biomed_datastore, out, plan=PLAN, library="cuvs", use_gpu=True)
    monkeypatch.setitem(__import__("sys").modules, "cuvs", None)  # not installed
    monkeypatch.setattr(cuvs_index, "cuvs_device", lambda device=None: torch.device("cpu"))
    for plan in (PLAN, IndexSettings()):  # the default plan of a small store is Flat: the install is named first
        with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'"):
            build_index(biomed_datastore, out, plan=plan, library="cuvs")
    install(monkeypatch)
    with pytest.raises(ValueError, match="IVF-PQ indexes"):
        build_index(biomed_datastore, out, plan=IndexSettings(factory="Flat"), library="cuvs")
    monkeypatch.undo()
    install(monkeypatch)  # cuVS importable, but no GPU
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            build_index(biomed_datastore, out, plan=PLAN, library="cuvs")
    assert not out.exists()


def test_layouts_cuvs_builds():
    assert ivf_pq_shape("IVF4096,PQ64") == (4096, 64) and ivf_pq_shape("IVF16,PQ8x8") == (16, 8)
    for factory in ("Flat", "IVF16,Flat", "OPQ16,IVF16,PQ16", "IVF16,PQ8x4"):
        with pytest.raises(ValueError, match="IVF-PQ"):
            ivf_pq_shape(factory)


@pytest.mark.skipif(importlib.util.find_spec("cuvs") is None, reason="cuVS is not installed (pip install -e '.[gpu]')")
def test_the_real_cuvs_accepts_the_parameters():
    """With cuVS installed (no GPU needed): its own IndexParams/SearchParams take what the package passes."""
    index = CuvsIVFPQ(768, "IVF4096,PQ64", torch.device("cpu"), nprobe=32)
    params, search = index.index_params(), index.search_params()
    assert (params.n_lists, params.pq_dim, params.pq_bits, params.metric) == (4096, 64, 8, "sqeuclidean")
    assert not params.add_data_on_build and params.kmeans_trainset_fraction == 1.0 and search.n_probes == 32
