import faiss
import numpy as np
import pytest

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.readers import Datastore
from lightning_memdec.retrieval.faiss_index import KeyIndex, build_index
from lightning_memdec.retrieval.index_plan import IndexRule, plan_index
from lightning_memdec.retrieval.settings import IndexSettings


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
    built = build_index(biomed_datastore, tmp_path / "ivf", plan=IndexSettings(factory="IVF16,Flat", nprobe=1))
    ivf = KeyIndex(built, nprobe=16)  # the nprobe asked when opening wins over the one recorded
    dist, ids = ivf.search(queries, 10)
    ref_d, _ = brute_force(keys, queries, 10)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    one_list = KeyIndex(built).search(queries, 10)[1]  # the recorded nprobe 1: approximate
    one_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(one_list, ref_ids)])
    assert one_recall < 0.95, one_recall
    pq = KeyIndex(build_index(biomed_datastore, tmp_path / "pq", plan=IndexSettings(factory="IVF16,PQ8", nprobe=16)))
    _, pq_ids = pq.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_ids, ref_ids)])
    assert recall > 0.5, recall
    assert pq.meta["factory"] == "IVF16,PQ8" and pq.meta["nprobe"] == 16


def test_planned_factory_by_size():
    """Flat below 200k entries; else IVF with ~4·sqrt(N) lists and PQ with the largest m ≤ 64 dividing d."""
    assert plan_index(10_000, 768).factory == "Flat"
    assert plan_index(1_000_000, 768).factory == "IVF4096,PQ64"
    assert plan_index(100_000_000, 896).factory == "IVF32768,PQ64"
    assert plan_index(10_000_000, 100).factory == "IVF16384,PQ50"


@pytest.mark.parametrize("dim", [64, 128, 256, 768])
def test_narrow_keys_get_uncompressed_lists_where_pq_would_not_halve_the_memory(dim):
    """IVF-PQ where its loaded bytes (codes + ids, PQ's precomputed table nlist × m × 256 floats, coarse centroids
    and codebooks) are at most half IVF-Flat's (4d-byte keys + ids, centroids), else IVF-Flat, at every size."""
    for n in (200_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 100_000_000):
        plan = plan_index(n, dim, memory_gb=64)
        nlist, m = plan.nlist, min(64, dim)
        pq_bytes = n * (m + 8) + nlist * m * 256 * 4 + nlist * dim * 4 + 256 * dim * 4
        flat_bytes = n * (4 * dim + 8) + nlist * dim * 4
        want = f"IVF{nlist},PQ{m}" if pq_bytes <= flat_bytes / 2 else f"IVF{nlist},Flat"
        assert plan.factory == want, (n, dim, pq_bytes / flat_bytes)
        assert ("IVF-Flat:" in " ".join(plan.notes)) == want.endswith("Flat")
    assert plan_index(300_000, 128).factory == "IVF2048,Flat"  # embedded:base-small's keys (benchmarks/pq_size.py)


def test_one_sizing_rule_with_the_quickstarts_numbers():
    """The quickstart's index, planned by index_plan's rule, is the one its own formula used to give."""
    import math

    from lightning_memdec.apps.quickstart_stages import INDEX_NPROBE, INDEX_RULE

    for n in (19_999, 20_000, 150_000, 199_999, 200_000, 1_000_000):
        plan = plan_index(n, 256, nprobe=INDEX_NPROBE, rule=INDEX_RULE)
        if n < 20_000:
            assert (plan.factory, plan.nlist, plan.train_size) == ("Flat", None, 0)
            continue
        nlist = 2 ** round(math.log2(math.sqrt(n)))
        assert (plan.factory, plan.nlist, plan.train_size) == (f"IVF{nlist},Flat", nlist, 64 * nlist)
    assert plan_index(1_000_000, 768, rule=IndexRule()) == plan_index(1_000_000, 768)  # the default rule as before
    with pytest.raises(ValueError, match="train_per_list must be in"):
        IndexRule(train_per_list=1000)


def test_bad_factory_and_existing_output(tmp_path, biomed_datastore, biomed_index):
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        build_index(biomed_datastore, tmp_path / "x", plan=IndexSettings(factory="NotAnIndex"))
    assert not (tmp_path / "x").exists()
    # a layout FAISS refuses whose cost the plan can still compute (2^99 centroids a sub-quantizer): named as what
    # it is, not as a memory error asking for 10^22 GiB
    with pytest.raises(ValueError, match=r"invalid FAISS factory string 'IVF8,PQ4x99'"):
        build_index(biomed_datastore, tmp_path / "x", plan=IndexSettings(factory="IVF8,PQ4x99"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArtifactError, match="already exists"):
        build_index(biomed_datastore, biomed_index, plan=IndexSettings(factory="Flat"))
    with pytest.raises(ArtifactError, match="does not exist"):
        build_index(tmp_path / "missing", tmp_path / "y")


def test_exact_distances_in_bounded_blocks_equal_one_pass():
    import torch

    from lightning_memdec.retrieval.exact_search import exact_distances

    def exact_squared_l2(queries, keys, ids, memory_bytes=256 * 2**20):
        return exact_distances(torch.from_numpy(queries), keys, torch.from_numpy(ids), memory_bytes).numpy()

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((50, 8)).astype(np.float16)
    queries = rng.standard_normal((13, 8)).astype(np.float32)
    ids = rng.integers(-1, 50, size=(13, 6))
    whole = exact_squared_l2(queries, keys, ids)
    blocked = exact_squared_l2(queries, keys, ids, memory_bytes=6 * 8 * 10 * 3)  # 3 queries per block
    np.testing.assert_array_equal(whole, blocked)
    want = ((keys.astype(np.float32)[np.maximum(ids, 0)] - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(whole, np.where(ids >= 0, want, np.inf), rtol=1e-6)


def test_plan_respects_faiss_constraints():
    from lightning_memdec.retrieval.index_plan import GPU_PQ_SIZES, check_gpu_k, plan_index

    big = plan_index(103_000_000, 1600, memory_gb=64)  # the paper's WikiText-103 / GPT2-xl store
    assert big.factory == "IVF32768,PQ64" and 1600 % big.pq_m == 0
    assert 39 * big.nlist <= big.train_size <= 256 * big.nlist  # not the old fixed 262,144 (8 per list)
    assert big.train_bytes <= 64 * 2**30
    tight = plan_index(103_000_000, 1600, memory_gb=1)  # 39 keys per list must fit the budget: fewer lists
    assert tight.nlist < big.nlist and 39 * tight.nlist * 1600 * 4 <= 2**30 and tight.notes
    gpu = plan_index(1_000_000, 1000, gpu=True)
    assert gpu.pq_m in GPU_PQ_SIZES and 1000 % gpu.pq_m == 0
    assert plan_index(10_000, 64).factory == "Flat" and plan_index(10_000, 64).train_size == 0
    explicit = plan_index(1_000_000, 64, factory="IVF1024,Flat")
    assert explicit.factory == "IVF1024,Flat" and explicit.train_size == 256 * 1024
    assert "index size" in big.describe()
    with pytest.raises(ValueError, match="k=4096 exceeds faiss-gpu's limit of 2048"):
        check_gpu_k(4096)


def test_build_index_records_measured_recall_and_plan_only(tmp_path, biomed_datastore):
    plan = build_index(biomed_datastore, tmp_path / "p", plan_only=True, plan=IndexSettings(factory="IVF8,Flat"))
    assert plan.factory == "IVF8,Flat" and not (tmp_path / "p").exists()
    flat = KeyIndex(
        build_index(
            biomed_datastore, tmp_path / "flat", recall_queries=50, recall_k=8, plan=IndexSettings(factory="Flat")
        )
    )
    assert flat.meta["recall"] == {"k": 8, "queries": 50, "recall": 1.0}  # exact search against exact search
    ivf = KeyIndex(
        build_index(
            biomed_datastore, tmp_path / "ivf", recall_queries=50, plan=IndexSettings(factory="IVF8,Flat", nprobe=1)
        )
    )
    assert 0 < ivf.meta["recall"]["recall"] < 1.0  # one of eight lists probed misses some true neighbours
    assert ivf.meta["train_size"] == min(len(Datastore(biomed_datastore)), 256 * 8)
    every_list = build_index(biomed_datastore, tmp_path / "all", recall_queries=50, recall_k=8,
                             plan=IndexSettings(factory="IVF8,Flat", nprobe=8))  # fmt: skip
    assert KeyIndex(every_list).meta["recall"]["recall"] == 1.0  # measured at the nprobe it records, not FAISS's 1
    from lightning_memdec.retrieval.index_plan import plan_index

    assert plan_index(1000, 32, factory="IVF8,Flat").train_size == 1000  # not 256 a list: more keys than the store


def test_plan_counts_the_ivfpq_precomputed_table_faiss_builds(tmp_path, biomed_datastore):
    from lightning_memdec.retrieval.index_plan import PRECOMPUTED_TABLE_MAX_BYTES, plan_index, precomputed_table_bytes

    built = KeyIndex(
        build_index(biomed_datastore, tmp_path / "pq", recall_queries=0, plan=IndexSettings(factory="IVF16,PQ8"))
    )
    table = faiss.downcast_index(built.index).precomputed_table.size() * 4  # what faiss holds beside the codes
    assert table == precomputed_table_bytes(16, 8) == 16 * 8 * 256 * 4
    n, d = len(Datastore(biomed_datastore)), Datastore(biomed_datastore).dim
    plan = plan_index(n, d, factory="IVF16,PQ8")
    assert plan.index_bytes == n * (8 + 8) + 16 * d * 4 + 256 * d * 4 + table
    paper = plan_index(103_000_000, 1600)  # 32768 × 64 × 256 floats = 2 GiB: at faiss's limit, still built
    assert precomputed_table_bytes(paper.nlist, paper.pq_m) == PRECOMPUTED_TABLE_MAX_BYTES
    assert precomputed_table_bytes(65536, 64) == 0  # above the limit faiss computes the terms per query instead


def test_gpu_clone_options_follow_faiss_gpu_constraints(tmp_path, biomed_datastore):
    from lightning_memdec.retrieval.faiss_index import pq_bytes
    from lightning_memdec.retrieval.index_plan import gpu_pq_options, plan_index

    assert gpu_pq_options(1600, 64) == (True, True)  # the paper's d = 1600, PQ64: 25 dims per sub-quantizer
    assert gpu_pq_options(768, 48) == (False, False) and gpu_pq_options(1024, 64) == (False, True)
    assert gpu_pq_options(256, None) == (False, False)
    assert any("usePrecomputed" in note for note in plan_index(103_000_000, 1600, gpu=True).notes)
    pq = KeyIndex(
        build_index(biomed_datastore, tmp_path / "pq", recall_queries=0, plan=IndexSettings(factory="IVF16,PQ8"))
    )
    assert pq_bytes(pq.index) == 8 and pq_bytes(faiss.IndexFlatL2(4)) is None


def test_gpu_request_without_gpu_faiss_names_an_install_that_exists():
    """The old message sent users to the removed ``[gpu]`` extra (which installed a second faiss beside faiss-cpu)."""
    from pathlib import Path

    from lightning_memdec.retrieval.faiss_index import gpu_available, to_gpu

    if gpu_available():
        pytest.skip("this faiss has GPU support")
    with pytest.raises(RuntimeError, match="faiss-gpu.*search='exact'") as raised:
        to_gpu(faiss.IndexFlatL2(4), 0)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "[gpu]" not in str(raised.value) and "faiss-gpu" not in pyproject
    assert '\ngpu = ["cuvs-cu13' in pyproject  # the GPU extra is cuVS (module cuvs): never a second faiss


@pytest.mark.parametrize("factory", ["PQ8", "SQ8", "OPQ8,IVF16,PQ8", "PCA16,Flat"])
def test_trainable_factories_without_a_leading_ivf_get_a_training_sample(tmp_path, biomed_datastore, factory):
    """Only a factory starting with IVF<n> got a sample: PQ, SQ, OPQ and PCA were trained on 0 keys and FAISS failed
    with a traceback. Each now trains on a sample (FAISS's own is_trained decides) and searches close to brute force."""
    keys = np.asarray(Datastore(biomed_datastore).keys, dtype=np.float32)
    plan = plan_index(len(keys), keys.shape[1], factory=factory)
    assert plan.train_size == min(len(keys), 256 * (plan.nlist or 256))
    index = KeyIndex(build_index(biomed_datastore, tmp_path / "i", plan=IndexSettings(factory=factory, nprobe=16)))
    assert index.meta["train_size"] == plan.train_size
    queries = keys[::61]
    _, ref_ids = brute_force(keys, queries, 10)
    _, ids = index.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)]) > 0.3


def test_an_index_that_needs_no_training_gets_no_sample_and_too_small_a_sample_is_refused(tmp_path, biomed_datastore):
    assert plan_index(3000, 32, factory="HNSW16").train_size == 0
    with pytest.raises(ValueError, match="--plan.train_size gives 100 training keys, too few to train PQ8; give "
                       "--plan.train_size 256 or more"):  # fmt: skip
        build_index(biomed_datastore, tmp_path / "i", plan=IndexSettings(factory="PQ8", train_size=100))
    assert not (tmp_path / "i").exists() and not (tmp_path / "i.partial").exists()
    # 4-bit codes have 16 centroids per sub-quantizer: 20 keys train them (the 8-bit minimum of 256 refused them)
    with pytest.raises(ValueError, match="gives 10 training keys, too few to train PQ8x4; give --plan.train_size 16"):
        build_index(biomed_datastore, tmp_path / "i", plan=IndexSettings(factory="PQ8x4", train_size=10))
    index = KeyIndex(build_index(biomed_datastore, tmp_path / "i", plan=IndexSettings(factory="PQ8x4", train_size=20)))
    assert index.meta["train_size"] == 20 and index.index.pq.nbits == 4
    plan = plan_index(3000, 32, factory="IVF4,PQ8x4")
    assert (plan.pq_centroids, plan_index(3000, 32, factory="PQ8").pq_centroids) == (16, 256)
    # codes (8 × 4 bits: 4 bytes) + ids, the lists' centroids, the codebooks, the precomputed table (4 × 8 × 16)
    assert plan.index_bytes == 3000 * (4 + 8) + 4 * 32 * 4 + 16 * 32 * 4 + 4 * 8 * 16 * 4
