"""The exact search backend against float64 brute force, the torch sparse-row builder against the numpy kernel,
and `build_targets(search="exact")` against the FAISS Flat path, its resume and the auto rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datastore import Interrupt, SimulatedKill

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.capacity import free_device_memory
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.kernels.sparse_targets import knn_distributions, stored_rows
from lightning_memdec.kernels.sparse_targets_torch import knn_distributions_torch
from lightning_memdec.retrieval.exact_search import (
    EXACT_CPU_MAX_ELEMENTS,
    EXACT_CPU_SELECTION_WIDTH,
    EXACT_GPU_MAX_ELEMENTS,
    choose_search,
    exact_distances,
    exact_search,
    resident_keys,
    squared_norms,
)
from lightning_memdec.retrieval.search_budget import block_rows, memory_budget
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets


def brute_force(queries, keys, k, exclude=None):
    """float64 squared L2 to every key; the own id +inf; (distances, ids) of the k nearest, ties by id."""
    d = ((keys.astype(np.float64)[None] - queries.astype(np.float64)[:, None]) ** 2).sum(-1)
    if exclude is not None:
        d[np.arange(len(queries)), exclude] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def assert_same_neighbours(got, want, rtol=1e-5):
    (dist, ids), (ref_d, ref_i) = got, want
    dist, ids = dist.numpy(), ids.numpy()
    assert dist.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == ref_i.shape
    np.testing.assert_allclose(dist, ref_d, rtol=rtol, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0), "rows are not sorted by distance"
    # ids equal up to ties: where a distance is unique in its row (and not at a tie across the k boundary)
    for row in range(len(ids)):
        if set(ids[row].tolist()) != set(ref_i[row].tolist()):
            boundary = ref_d[row, -1]
            differ = set(ids[row].tolist()) ^ set(ref_i[row].tolist())
            assert np.allclose(dist[row][np.isin(ids[row], list(differ))], boundary, rtol=1e-5), row


@pytest.fixture(scope="module")
def keys():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((403, 24)).astype(np.float16)
    keys[7] = keys[3]  # an exact tie
    return keys


@pytest.mark.parametrize("selection", ["topk", "threshold"])
@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("block_size", [None, 64])
def test_a_tie_wider_than_the_margin_keeps_the_lowest_ids(selection, coarse, block_size):
    """60 copies of one key (a repeated context) tie across the k-th place, far more than the re-ranking margin: the
    k kept are the lowest ids, as float64 brute force and FAISS keep them, not whichever the selection met first."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1500, 16)).astype(np.float16)
    keys[700:760] = keys[5]
    near = keys[[5] * 4].astype(np.float32) + rng.normal(0, 0.01, (4, 16)).astype(np.float32)
    members = np.array([5, 700, 730, 759])  # queries that are copies themselves, their own id left out
    for queries, own in ((near, None), (keys[members], members)):
        for k in (30, 61):  # the copies fill the k-th place; with 61 (all of them and the original) the next key's too
            mode = {"coarse": coarse, "selection": "topk" if coarse else selection, "block_size": block_size}
            got_d, got_i = exact_search(queries, keys, k, query_ids=own, **mode)
            want_d, want_i = brute_force(queries, keys, k, exclude=own)
            np.testing.assert_array_equal(got_i.numpy(), want_i)
            np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [None, 50, 64, 7])
@pytest.mark.parametrize("self_exclude", [False, True])
def test_exact_equals_brute_force(keys, block_size, self_exclude):
    queries = keys[:60]
    own = np.arange(60) if self_exclude else None
    for k in (1, 12, 90):  # 90 > every block size but None
        got = exact_search(queries, keys, k, query_ids=own, block_size=block_size)
        assert_same_neighbours(got, brute_force(queries, keys, k, exclude=own))
        if self_exclude:
            assert not np.any(got[1].numpy() == own[:, None])


def test_exact_with_foreign_queries_torch_keys_and_a_margin_of_zero(keys):
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((33, 24)).astype(np.float32)
    want = brute_force(queries, keys, 20)
    assert_same_neighbours(exact_search(queries, keys, 20, block_size=13, margin=0), want)
    assert_same_neighbours(exact_search(torch.from_numpy(queries), torch.from_numpy(keys), 20, block_size=100), want)


@pytest.mark.parametrize("self_exclude", [False, True])
def test_coarse_bf16_scores_and_cached_norms_equal_brute_force(keys, self_exclude):
    """bf16 products and scores (8 significant bits) choose the candidates; the fp32 re-ranking restores brute force."""
    queries = keys[:60]
    own = np.arange(60) if self_exclude else None
    norms = squared_norms(torch.from_numpy(keys))
    np.testing.assert_allclose(norms.numpy(), (keys.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    for k in (1, 12, 90):
        want = brute_force(queries, keys, k, exclude=own)
        got = exact_search(queries, keys, k, query_ids=own, block_size=64, coarse=True, key_norms=norms)
        assert_same_neighbours(got, want)
    with pytest.raises(ValueError, match=r"key_norms must be \[403\]"):
        exact_search(queries, keys, 3, key_norms=norms[:5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_without_fp32_output_equal_brute_force(keys, dtype):
    """A GPU without fp32-output products: the product is rounded, ‖k‖² added in fp32, the re-ranking exact."""
    own = np.arange(60)
    got = exact_search(keys[:60], keys, 12, query_ids=own, block_size=64, compute_dtype=dtype)
    assert_same_neighbours(got, brute_force(keys[:60], keys, 12, exclude=own))


def test_coarse_search_falls_back_where_bf16_cannot_vouch_for_the_candidates():
    """Tight clusters far from the origin: bf16 scores (spacing ~256 at ‖k‖² ≈ 6·10⁴) cannot tell the neighbours
    from the next hundred keys, so every row fails the error bound and is searched again in fp32, still exact."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((20, 64)) * 30
    keys = (centers[rng.integers(0, 20, 3000)] + rng.standard_normal((3000, 64))).astype(np.float16)
    own = np.arange(100)
    want = brute_force(keys[:100], keys, 16, exclude=own)
    assert_same_neighbours(exact_search(keys[:100], keys, 16, query_ids=own, coarse=True), want)


def test_coarse_search_on_real_hidden_states_equals_fp32_search(biomed_datastore):
    """Keys from a real LM layer: clustered, with large norms, where bf16 scores lose the most."""
    store = Datastore(biomed_datastore)
    queries = np.asarray(store.keys[:200], dtype=np.float32)
    want = brute_force(queries, np.asarray(store.keys), 16, exclude=np.arange(200))
    got = exact_search(queries, store.keys, 16, query_ids=np.arange(200), coarse=True)
    assert_same_neighbours(got, want)


def test_one_exact_rerank_for_both_backends_marks_missing_ids(keys):
    """FAISS returns −1 for a neighbour it did not find: +inf there, Σ (q − k)² elsewhere."""
    queries = torch.randn(4, 24)
    ids = torch.tensor([[0, 5, -1], [402, -1, -1], [7, 3, 1], [-1, 0, 0]])
    got = exact_distances(queries, keys, ids)
    want = ((torch.from_numpy(keys).double()[ids.clamp(min=0)] - queries.double()[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(got, torch.where(ids >= 0, want, torch.inf).float())
    torch.testing.assert_close(exact_distances(queries, torch.from_numpy(keys), ids), got, rtol=0, atol=0)


def test_k_up_to_the_store_and_no_further(keys):
    queries = keys[:5]
    own = np.arange(5)
    got = exact_search(queries, keys, len(keys) - 1, query_ids=own, block_size=64)
    assert_same_neighbours(got, brute_force(queries, keys, len(keys) - 1, exclude=own))
    assert_same_neighbours(exact_search(queries, keys, len(keys), block_size=64), brute_force(queries, keys, len(keys)))
    with pytest.raises(ValueError, match="k must be a whole number in"):
        exact_search(queries, keys, len(keys), query_ids=own)
    for bad in (3.0, True):  # were a TypeError from torch.full, and k = 1
        with pytest.raises(ValueError, match=f"k must be a whole number in \\[1, 402\\] for 403 keys, got {bad}"):
            exact_search(queries, keys, bad, query_ids=own)
    assert exact_search(queries, keys, np.int64(3), query_ids=own)[1].shape == (5, 3)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_own_ids_must_be_one_a_query(keys, selection):
    """Two own ids for five queries were taken: rows 2–4 then found their own key, at distance 0."""
    for own in (np.arange(2), np.arange(10).reshape(5, 2), torch.arange(6)):
        with pytest.raises(ValueError, match=r"query_ids must be \[5\], one own key id a query"):
            exact_search(keys[:5], keys, 3, query_ids=own, selection=selection)


def test_memory_budget_sets_the_block_size(keys):
    assert block_rows(60, 24, 20, 1 << 40, torch.float32) > len(keys)
    assert block_rows(60, 24, 20, 1, torch.float32) == 1
    small = exact_search(keys[:10], keys, 5, query_ids=np.arange(10), memory_bytes=20_000)
    assert_same_neighbours(small, brute_force(keys[:10], keys, 5, exclude=np.arange(10)))


def test_gpu_budget_counts_this_process_cached_memory_as_free(monkeypatch):
    """A search's blocks stay in torch's cache after it: the next call's budget must count them free, or each chunk of
    build_targets would search in smaller blocks than the last (e.g. 141 GB, 3 GB of resident keys, 61 GB of a first
    search's blocks cached: the driver says 77 GB free, 138 GB are). Device queries stubbed: this machine has no GPU."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (77 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 64 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib)  # the resident keys
    assert free_device_memory("cuda") == 138 * gib
    assert memory_budget("cuda") == 69 * gib
    assert memory_budget("cuda", 5) == 5
    # keys stay resident within 40 % of the same figure (scaled down 2^20: 138 KiB free), refused before any copy
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (77 * gib // 2**20, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 64 * gib // 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * gib // 2**20)
    keys_of = lambda kib: np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), (int(kib * 2**10 / 2), 1), (0, 0))
    assert resident_keys(keys_of(55.3), "cuda") is None
    empty, asked = torch.empty, []

    def on_the_host(*shape, device=None, **kwargs):  # the "device" copy, made on the CPU: no GPU here
        asked.append(torch.device(device))
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", on_the_host)
    copy = resident_keys(keys_of(40), "cuda")  # 40 KiB fit 40 % of 138 (not of 77)
    assert copy.shape == (20_480, 1) and asked == [torch.device("cuda")]


def test_resident_keys_copy_in_blocks_and_only_when_they_fit(keys, tmp_path):
    stored = np.lib.format.open_memmap(tmp_path / "keys.npy", mode="w+", dtype=keys.dtype, shape=keys.shape)
    stored[:] = keys
    copy = resident_keys(stored, "cpu", max_bytes=keys.nbytes, block=7)  # 403 rows: 57 full blocks and a partial one
    assert copy.dtype == torch.float16 and np.array_equal(copy.numpy(), keys)
    assert resident_keys(stored, "cpu", max_bytes=keys.nbytes - 1) is None
    own = np.arange(20)
    got = exact_search(keys[:20], copy, 9, query_ids=own, block_size=50)
    assert_same_neighbours(got, brute_force(keys[:20], keys, 9, exclude=own))


@pytest.mark.parametrize(
    "truncation", [{}, {"max_support": 3}, {"min_prob": 0.05}, {"max_support": 5, "min_prob": 0.1}]
)
@pytest.mark.parametrize("temperature", [1.0, 16.0])
def test_torch_rows_equal_the_numpy_kernel(truncation, temperature):
    rng = np.random.default_rng(2)
    n, k, vocab = 200, 48, 40
    dist = np.sort(rng.gamma(2.0, 10.0, size=(n, k)).astype(np.float32), axis=1)
    dist[:, 5] = dist[:, 4]  # tied distances
    dist[3, 10:] = np.inf  # ignored neighbours
    dist[4, 1:] = 1e4  # weights that underflow to 0
    ids = rng.integers(0, 500, size=(n, k))
    values = rng.integers(0, vocab, size=500).astype(np.int32)
    want = knn_distributions(dist, ids, values, temperature, **truncation)
    got = knn_distributions_torch(torch.from_numpy(dist), torch.from_numpy(values)[ids], temperature, **truncation)
    assert [g.dtype for g in got] == [np.int64, np.int32, np.float32]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-7)  # well inside fp16 rounding
    with pytest.raises(ValueError, match="row 1 has a NaN"):
        bad = torch.from_numpy(dist).clone()
        bad[1, 0] = float("nan")
        knn_distributions_torch(bad, torch.from_numpy(values)[ids], temperature)


def test_torch_rows_keep_the_top_token_and_a_token_at_the_threshold_as_the_numpy_kernel():
    """min_prob's edges, as the numpy kernel has them: a row whose tokens all fall under it keeps its top token (a
    position never loses its target), a token at exactly min_prob is kept; a row with no neighbour (+inf) or a −inf
    distance is refused."""
    dist = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, float("inf"), float("inf")]])  # p 0.25 ×4; p 0.5 ×2
    tokens = torch.tensor([[3, 5, 7, 9], [3, 5, 3, 3]])
    for min_prob in (0.5, 0.3):
        got = knn_distributions_torch(dist, tokens, 16.0, min_prob=min_prob)
        want = knn_distributions(dist.numpy(), np.arange(8).reshape(2, 4), tokens.flatten().numpy().astype(np.int32),
                                 16.0, min_prob=min_prob)  # fmt: skip
        assert got[0].tolist() == want[0].tolist() == [1, 2]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
    for bad_distance in (float("inf"), float("-inf")):
        bad = dist.clone()
        bad[1, :2] = bad_distance
        with pytest.raises(ValueError, match="row 1 has a NaN or -inf distance"):
            knn_distributions_torch(bad, tokens, 16.0)


def test_torch_rows_as_stored_equal_stored_rows_of_them():
    """``stored=True`` makes on the device what ``stored_rows`` makes on the host, byte for byte: with tails that fp16
    rounds to 0 (dropped, every row renormalised) and without (only cast)."""
    rng = np.random.default_rng(3)
    n, k, vocab = 300, 64, 1000
    values = torch.from_numpy(rng.integers(0, vocab, size=5000).astype(np.int32))
    tokens = values[torch.from_numpy(rng.integers(0, 5000, size=(n, k)))]
    for spread in (400.0, 2.0):  # weights down to exp(−400/16): fp16 zeros; or all well inside fp16
        dist = torch.from_numpy(np.sort(rng.uniform(0, spread, size=(n, k)).astype(np.float32), axis=1))
        plain = knn_distributions_torch(dist, tokens, 16.0)
        got = knn_distributions_torch(dist, tokens, 16.0, stored=True)
        want = stored_rows(*plain)
        assert (len(want[1]) < len(plain[1])) == (spread == 400.0)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w)


def test_auto_rule():
    assert choose_search(2 * 10**6, 768, "cuda") == "exact"  # the GPU benchmark's store
    assert choose_search(EXACT_GPU_MAX_ELEMENTS // 1024, 1024, "cuda") == "exact"
    assert choose_search(EXACT_GPU_MAX_ELEMENTS // 1024 + 1, 1024, "cuda") == "faiss"
    assert choose_search(103 * 10**6, 1600, "cuda") == "faiss"  # the paper's WikiText-103 / GPT2-xl store
    assert choose_search(103 * 10**6, 1600, "cuda", have_index=False) == "exact"
    assert choose_search(10**6, 1024, "cpu", have_index=False) == "exact"
    edge = EXACT_CPU_MAX_ELEMENTS // (32 + EXACT_CPU_SELECTION_WIDTH)  # the selection's cost counts, not d alone
    assert choose_search(edge, 32, "cpu") == "exact" and choose_search(edge + 1, 32, "cpu") == "faiss"
    assert choose_search(500_000, 64, "cpu") == "faiss"  # ~12× slower exact than its index (hostile audit 13)
    assert choose_search(10**6, 1024, "cpu") == "faiss"


def rows(path):
    t = Targets(path)
    return [dict(zip(*(a.tolist() for a in t.row(i)))) for i in range(len(t))]


@pytest.fixture(scope="module")
def exact_targets(tmp_path_factory, biomed_datastore):
    out = tmp_path_factory.mktemp("exact") / "t"
    return build_targets(
        biomed_datastore,
        None,
        out,
        knn=KNNTargets(k=16, temperature=4.0),
        search=TargetSearch(chunk_size=512, backend="exact"),
    )


def test_exact_targets_equal_faiss_flat_targets(tmp_path, biomed_datastore, biomed_index, exact_targets):
    flat = build_targets(
        biomed_datastore,
        biomed_index,
        tmp_path / "f",
        knn=KNNTargets(k=16, temperature=4.0),
        search=TargetSearch(backend="faiss"),
    )
    meta_e, meta_f = Targets(exact_targets).meta, Targets(flat).meta
    assert (meta_e["search"], meta_e["index_factory"], meta_e["nprobe"]) == ("exact", None, None)
    assert (meta_f["search"], meta_f["index_factory"]) == ("faiss", "Flat")
    assert meta_e["num_positions"] == meta_f["num_positions"] and meta_e["self_excluded"]
    got, want = rows(exact_targets), rows(flat)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), i
        assert max(abs(g[t] - w[t]) for t in g) <= 1e-3, i  # fp16 rounding of probs from fp32 distances


def test_index_settings_that_exact_search_ignores_are_said(tmp_path, biomed_datastore, caplog):
    """--search.use_gpu and --knn.nprobe set an index search; with the exact backend they changed nothing, in silence
    (the same bytes, meta nprobe None): a user who set them is told, and the run is as without them."""
    knn, search = KNNTargets(k=4, temperature=4.0, nprobe=3), TargetSearch(backend="exact", use_gpu=True)
    with caplog.at_level("WARNING", logger="lightning_memdec.stages.targets"):
        told = build_targets(biomed_datastore, None, tmp_path / "told", knn=knn, search=search)
    assert "--search.use_gpu searches a FAISS index on the GPU; exact search runs on" in caplog.text
    assert "--knn.nprobe 3 sets the IVF lists an index search visits; exact search visits every key" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_memdec.stages.targets"):
        plain = build_targets(biomed_datastore, None, tmp_path / "plain", knn=KNNTargets(k=4, temperature=4.0),
                              search=TargetSearch(backend="exact"))  # fmt: skip
    assert "ignores it" not in caplog.text
    for name in ("ids.npy", "probs.npy", "offsets.npy"):
        assert (Path(told) / name).read_bytes() == (Path(plain) / name).read_bytes(), name


def test_auto_picks_exact_here_and_faiss_without_index_is_refused(tmp_path, biomed_datastore, biomed_index, caplog):
    with caplog.at_level("WARNING"):
        search = TargetSearch(backend="faiss", selection="threshold")
        build_targets(
            biomed_datastore, biomed_index, tmp_path / "f", knn=KNNTargets(k=4, temperature=4.0), search=search
        )
    assert "--search.selection threshold chooses exact search's candidates; the faiss backend ignores it" in caplog.text
    with caplog.at_level("INFO", logger="lightning_memdec.stages.targets"):
        out = build_targets(
            biomed_datastore,
            biomed_index,
            tmp_path / "a",
            knn=KNNTargets(k=4, temperature=4.0),
            search=TargetSearch(chunk_size=2048),
        )
    assert Targets(out).meta["search"] == "exact"  # a tiny store on the CPU: N·(d + 768) ≤ 2^26
    assert "search: exact (--search.backend auto, 2999 keys of 32 dims on the cpu)" in caplog.text
    assert KNNTargets().exact_distances is False and Targets(out).meta["exact_distances"] is True  # as searched
    with pytest.raises(ValueError, match="needs an index"):
        build_targets(biomed_datastore, None, tmp_path / "b", search=TargetSearch(backend="faiss"))
    with pytest.raises(ValueError, match="--search.backend must be one of"):
        build_targets(biomed_datastore, biomed_index, tmp_path / "b", search=TargetSearch(backend="ivf"))


def test_exact_resume_after_kill_gives_identical_bytes(tmp_path, biomed_datastore, biomed_index, exact_targets):
    out = tmp_path / "t"
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch("exact", chunk_size=512))
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=2)], **kwargs)
    assert partial_dir(out).exists() and not out.exists()
    assert json.loads((partial_dir(out) / "run_config.json").read_text())["search"] == "exact"
    with pytest.raises(ArtifactError, match="different settings"):  # another backend does not resume this run
        build_targets(
            biomed_datastore, biomed_index, out, **{**kwargs, "search": TargetSearch("faiss", chunk_size=512)}
        )
    exact = TargetSearch("exact", memory_gb=1e-3, chunk_size=512)  # ~50-key blocks, same result
    build_targets(biomed_datastore, None, out, knn=kwargs["knn"], search=exact)
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (exact_targets / name).read_bytes()


def test_exact_backend_runs_without_faiss(tmp_path, biomed_datastore, exact_targets):
    out = tmp_path / "t"
    script = (
        "import sys; sys.modules['faiss'] = None\n"  # any `import faiss` now fails
        "from lightning_memdec.stages.targets import build_targets\n"
        "from lightning_memdec.stages.settings import KNNTargets, TargetSearch\n"
        f"build_targets({str(biomed_datastore)!r}, out={str(out)!r}, knn=KNNTargets(k=16, temperature=4.0),"
        " search=TargetSearch(chunk_size=512))\n"
        "assert 'lightning_memdec.retrieval.faiss_index' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (exact_targets / name).read_bytes()
    assert Datastore(biomed_datastore).dim == 32
