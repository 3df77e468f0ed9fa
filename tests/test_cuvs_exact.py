"""Exact search with cuVS's brute force choosing the candidates (``selection="cuvs"``), on the CPU through the
stand-in for cuVS's API (tests/cuvs_double.py, which ranks by the expanded form in fp32 as cuVS does): the package's
glue (own entry dropped, candidates re-ranked exactly, keys searched in place) against float64 brute force and the
topk selection's targets. cuVS's own speed is measured by benchmarks/gpu.py."""

from __future__ import annotations

import importlib.util
import inspect
import sys

import numpy as np
import pytest
import torch
from test_exact_search import assert_same_neighbours, brute_force, exact_targets, keys  # noqa: F401 (fixtures)

from lightning_memdec.io.readers import Targets
from lightning_memdec.retrieval import cuvs_index
from lightning_memdec.retrieval.exact_search import exact_search
from lightning_memdec.retrieval.sharded_search import shard_search
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets


@pytest.fixture
def searches(cuvs, monkeypatch):
    """The double's brute-force searches, counted: (k asked) per call."""
    brute_force_module = sys.modules["cuvs.neighbors.brute_force"]
    search, calls = brute_force_module.search, []

    def counted(index, queries, k, **kwargs):
        calls.append(k)
        return search(index, queries, k, **kwargs)

    monkeypatch.setattr(brute_force_module, "search", counted)
    return calls


@pytest.fixture
def devices_asked(cuvs, monkeypatch):
    """The devices the package asks ``cuvs_device`` for (the double's GPU is the CPU): the keys', never None, which
    means the current GPU, another than the keys' on a second card."""
    asked = []

    def on_cpu(device=None):
        asked.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(cuvs_index, "cuvs_device", on_cpu)
    return asked


@pytest.mark.parametrize("self_exclude", [False, True])
def test_cuvs_candidates_equal_brute_force(keys, searches, devices_asked, self_exclude):  # noqa: F811
    resident = torch.from_numpy(keys)
    queries = keys[:60]
    own = np.arange(60) if self_exclude else None
    for k in (1, 12, 90):
        got = exact_search(queries, resident, k, query_ids=own, selection="cuvs")
        assert_same_neighbours(got, brute_force(queries, keys, k, exclude=own))
        if self_exclude:
            assert not np.any(got[1].numpy() == own[:, None])
    # k + the fp32 re-ranking's margin (8 + k // 16) candidates, and one more for the own entry it drops
    assert searches == [c + self_exclude for c in (9, 20, 103)]
    assert devices_asked == [resident.device] * 3
    builds = [kwargs for name, _, kwargs in sys.modules["cuvs.neighbors.brute_force"].calls if name == "build"]
    assert [kwargs["metric"] for kwargs in builds] == ["sqeuclidean"] * 3


def test_foreign_queries_and_fp32_keys(searches):
    rng = np.random.default_rng(1)
    stored = rng.standard_normal((301, 24)).astype(np.float32)
    queries = rng.standard_normal((33, 24)).astype(np.float32)
    for margin in (0, None):
        got = exact_search(queries, torch.from_numpy(stored), 20, margin=margin, selection="cuvs")
        assert_same_neighbours(got, brute_force(queries, stored, 20))
    assert searches == [20, 29]


def test_the_own_entry_goes_wherever_it_sits_and_the_farthest_where_it_is_absent(cuvs, monkeypatch):
    """The query's own entry is dropped among copies of it (distance ties); where cuVS did not return it (copies
    outrank it arbitrarily), the farthest candidate goes instead, so every row keeps the count asked for."""
    line = torch.zeros(50, 8, dtype=torch.float16)
    line[:, 0] = torch.arange(50, dtype=torch.float16)
    line[20:23] = line[20]  # 20, 21, 22 are copies
    dist, ids = exact_search(line[[21, 40]], line, 4, query_ids=[21, 40], selection="cuvs", margin=0)
    assert ids.tolist() == [[20, 22, 19, 18], [39, 41, 38, 42]] and dist[1].tolist() == [1.0, 1.0, 4.0, 4.0]
    found = torch.tensor([[22, 21, 20, 19], [20, 22, 19, 23]])  # row 0: own (21) second; row 1: own absent

    def fixed(index, queries, k, neighbors, distances, resources):
        neighbors.copy_(found[:, :k])
        distances.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])[:, :k])

    monkeypatch.setattr(sys.modules["cuvs.neighbors.brute_force"], "search", fixed)
    from lightning_memdec.retrieval.cuvs_exact import brute_force_candidates

    dist, ids = brute_force_candidates(line[[21, 21]], line, torch.tensor([21, 21]), 3)
    assert ids.tolist() == [[22, 20, 19], [20, 22, 19]] and dist.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def test_a_key_shard_searched_by_cuvs_equals_topk(keys, searches):  # noqa: F811
    """--search.shard_keys: a rank's shard of the keys, the queries' own ids inside, before or after it."""
    shard = torch.from_numpy(keys[100:250])
    queries, own = keys[[120, 30, 300]], np.array([120, 30, 300])
    for k in (5, 60):
        want = shard_search(queries, shard, 100, k, own, selection="topk")
        got = shard_search(queries, shard, 100, k, own, selection="cuvs")
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert 120 not in got[1][0].tolist() and got[1].min() >= 100 and got[1].max() < 250
    assert len(searches) == 2


def test_refused_with_what_to_do(keys, cuvs, tmp_path, monkeypatch):  # noqa: F811
    stored = np.lib.format.open_memmap(tmp_path / "keys.npy", mode="w+", dtype=np.float16, shape=keys.shape)
    stored[:] = keys
    with pytest.raises(ValueError, match="resident on the search's device.*a file on the host.*'topk' or 'threshold'"):
        exact_search(keys[:4], stored, 3, selection="cuvs")
    with pytest.raises(ValueError, match="fp16 or fp32 keys"):
        exact_search(keys[:4], torch.from_numpy(keys).bfloat16(), 3, selection="cuvs")
    with pytest.raises(ValueError, match="coarse=True"):
        exact_search(keys[:4], torch.from_numpy(keys), 3, selection="cuvs", coarse=True)
    with pytest.raises(ValueError, match="selection must be one of"):
        exact_search(keys[:4], torch.from_numpy(keys), 3, selection="faiss")
    monkeypatch.setitem(sys.modules, "cuvs.neighbors", None)  # cuVS not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'"):
        exact_search(keys[:4], torch.from_numpy(keys), 3, selection="cuvs")


def test_targets_with_cuvs_equal_the_topk_targets(tmp_path, biomed_datastore, exact_targets, searches):  # noqa: F811
    """The same bytes as the topk selection's targets (chunks of 512 queries: topk on the CPU), the keys copied to
    the device once and searched in place."""
    out = build_targets(
        biomed_datastore,
        None,
        tmp_path / "t",
        knn=KNNTargets(k=16, temperature=4.0),
        search=TargetSearch(chunk_size=512, backend="exact", selection="cuvs"),
    )
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (exact_targets / name).read_bytes()
    assert len(searches) == -(-len(Targets(out)) // 512) and set(searches) == {16 + 9 + 1}


def test_targets_refuse_cuvs_before_any_work(tmp_path, biomed_datastore, monkeypatch):
    monkeypatch.setitem(sys.modules, "cuvs", None)  # not installed
    search = TargetSearch(backend="exact", selection="cuvs")
    with pytest.raises(ImportError, match=r"--search.selection cuvs needs cuVS"):
        build_targets(biomed_datastore, None, tmp_path / "t", search=search)
    monkeypatch.undo()
    from cuvs_double import install

    install(monkeypatch)  # cuVS importable, but no GPU
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            build_targets(biomed_datastore, None, tmp_path / "t", search=search)
    # a GPU machine (simulated), the ranks left on the CPU (the default accelerator): cuVS would get host memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuvs_index, "cuvs_device", lambda device=None: torch.device("cuda", 0))
    with pytest.raises(ValueError, match="--hardware.accelerator cpu runs the search on the CPU"):
        build_targets(biomed_datastore, None, tmp_path / "t", search=search)
    assert not (tmp_path / "t").exists()


def test_cuvs_refuses_tensors_off_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="cuVS reads GPU memory, and these tensors are on cpu"):
        cuvs_index.cuvs_device(torch.device("cpu"))
    assert cuvs_index.cuvs_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


@pytest.mark.skipif(importlib.util.find_spec("cuvs") is None, reason="cuVS is not installed (pip install -e '.[gpu]')")
def test_the_real_cuvs_brute_force_takes_the_arguments_passed(keys, monkeypatch):  # noqa: F811
    """With cuVS installed (no GPU needed): the calls brute_force_candidates makes, recorded through the double,
    bind to the real build's and search's signatures."""
    from cuvs.neighbors import brute_force
    from cuvs_double import install

    real = {name: inspect.signature(getattr(brute_force, name)) for name in ("build", "search")}
    install(monkeypatch)
    monkeypatch.setattr(cuvs_index, "cuvs_device", lambda device=None: torch.device("cpu"))
    exact_search(keys[:5], torch.from_numpy(keys), 4, query_ids=np.arange(5), selection="cuvs")
    calls = sys.modules["cuvs.neighbors.brute_force"].calls
    assert [name for name, _, _ in calls] == ["build", "search"]
    for name, args, kwargs in calls:
        real[name].bind(*args, **kwargs)
