"""Threshold selection (kernels.threshold_select) against direct references: the buffers it appends to, the plan,
and exact_search(selection="threshold") against float64 brute force and the topk selection, including the rows it
must search again (buffer overflow) and real hidden states."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_exact_search import assert_same_neighbours, brute_force

from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.kernels.threshold_select import (
    AUTO_MIN_KEYS_PER_CANDIDATE,
    AUTO_MIN_QUERIES,
    OVERSAMPLE,
    SAMPLE_RANK,
    CandidateBuffers,
    best_in_buffers,
    candidate_buffers,
    choose_selection,
    collect_below,
    needs_fallback,
    threshold_plan,
)
from lightning_memdec.retrieval.exact_search import exact_search
from lightning_memdec.retrieval.search_budget import rerank_margin, search_fits
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets


def reference_buffers(score: np.ndarray, tau: np.ndarray, key_offset: int, capacity: int):
    """Per row: the first ``capacity`` (column order) ids of entries ≤ τ with their scores, and the full count."""
    kept, counts = [], []
    for row, limit in zip(score, tau):
        cols = np.flatnonzero(row <= limit)
        counts.append(len(cols))
        kept.append(dict(zip((cols[:capacity] + key_offset).tolist(), row[cols[:capacity]].tolist())))
    return kept, np.array(counts)


def test_collect_below_appends_block_after_block_and_counts_what_it_drops():
    rng = np.random.default_rng(0)
    score = rng.standard_normal((9, 300)).astype(np.float32)
    score[2] = -5.0  # every entry under τ: 300 hits, more than the buffer holds
    score[4, 17] = np.inf  # the query's own key: never kept
    tau = np.quantile(score, 0.1, axis=1).astype(np.float32)
    tau[2] = 0.0
    capacity = 64
    buffers = candidate_buffers(9, capacity, "cpu")
    for b0 in (0, 120, 250):  # three blocks of one key range, appended in turn
        b1 = {0: 120, 120: 250, 250: 300}[b0]
        collect_below(torch.from_numpy(score[:, b0:b1]), torch.from_numpy(tau), b0 + 1000, buffers)
    scores, ids, counts = buffers
    kept, want_counts = reference_buffers(score, tau, 1000, capacity)
    np.testing.assert_array_equal(counts.numpy(), want_counts)
    for row in range(9):
        got = {i: s for i, s in zip(ids[row].tolist(), scores[row].tolist()) if i >= 0}
        assert got == pytest.approx(kept[row]), row
        assert (ids[row] >= 0).sum() == min(capacity, want_counts[row])
    assert 1017 not in ids[4].tolist()
    overflow = needs_fallback(counts, 20, capacity).numpy()
    np.testing.assert_array_equal(overflow, (want_counts < 20) | (want_counts > capacity))
    assert overflow[2]


def test_plan_samples_enough_keys_for_its_rank_and_declines_small_stores():
    candidates = 1024 + rerank_margin(1024, torch.float16)
    plan = threshold_plan(2_000_000, candidates)
    expected = OVERSAMPLE * candidates
    assert plan.rank == SAMPLE_RANK and plan.stride == expected // SAMPLE_RANK
    assert plan.capacity >= 2 * expected and plan.capacity % 128 == 0
    assert 2_000_000 // plan.stride >= 8 * plan.rank  # the sample has far more keys than its rank
    assert threshold_plan(8 * expected - 1, candidates) is None  # a store too small for a sample to pay
    assert threshold_plan(10**9, 40) is None  # stride under 4: the sample would be a quarter of the store


@pytest.fixture(scope="module")
def clustered_keys():
    """20,000 keys of d = 32 with 4,000 copies of one key: the queries beside it find them all under τ, more than
    the buffer holds, and must be searched again."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((20_000, 32)).astype(np.float16)
    keys[5_000:9_000] = keys[5_000]
    return keys


@pytest.fixture
def threshold_path(monkeypatch):
    """What exact search's threshold selection did: key blocks collected, rows searched again (by position)."""
    import lightning_memdec.retrieval.exact_search as search

    seen = {"blocks": 0, "searched_again": []}
    collect, fallback = search.collect_below, search.needs_fallback

    def counted_collect(*args, **kwargs):
        seen["blocks"] += 1
        return collect(*args, **kwargs)

    def recorded_fallback(*args, **kwargs):
        redo = fallback(*args, **kwargs)
        seen["searched_again"] += redo.nonzero().squeeze(1).tolist()
        return redo

    monkeypatch.setattr(search, "collect_below", counted_collect)
    monkeypatch.setattr(search, "needs_fallback", recorded_fallback)
    return seen


@pytest.mark.parametrize("block_size", [None, 3_000])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_threshold_search_equals_brute_force_and_topk(clustered_keys, block_size, as_tensor, threshold_path):
    rng = np.random.default_rng(1)
    k = 256
    candidates = k + rerank_margin(k, torch.float32)
    plan = threshold_plan(len(clustered_keys), candidates)
    assert plan is not None and plan.capacity < 4_000  # the cluster overflows the buffer: fallback rows exist
    own = np.concatenate([rng.integers(0, 20_000, 30), np.arange(5_000, 5_010)])  # 10 queries from the cluster
    queries = clustered_keys[own].astype(np.float32) + 0.01 * rng.standard_normal((40, 32)).astype(np.float32)
    keys = torch.from_numpy(clustered_keys) if as_tensor else clustered_keys
    got = exact_search(queries, keys, k, own, block_size=block_size, selection="threshold")
    assert_same_neighbours(got, brute_force(queries, clustered_keys, k, exclude=own))
    # the threshold path ran, block by block; the rows the cluster overflowed were searched again (and the random
    # rows whose τ lies beyond the cluster's key: 8 of 30 here), the others served from the buffer
    assert threshold_path["blocks"] == (1 if block_size is None else -(-len(keys) // block_size))
    searched_again = set(threshold_path["searched_again"])
    assert searched_again >= set(range(30, 40)) and len(searched_again) < len(queries), sorted(searched_again)
    topk = exact_search(queries, keys, k, own, block_size=block_size)
    assert torch.equal(got[1], topk[1]) and torch.equal(got[0], topk[0])
    assert not np.any(got[1].numpy() == own[:, None])


def test_a_budget_the_buffers_would_crowd_out_searches_by_topk(threshold_path):
    """A budget that holds topk's working set but not with the threshold's candidate buffers beside it: topk, not a
    refusal in the middle of build_targets naming a --search.memory_gb that was already met."""
    rng = np.random.default_rng(5)
    n, dim, k = 256, 1_024, 100
    keys = torch.from_numpy(rng.standard_normal((6_000, dim)).astype(np.float16))
    queries = rng.standard_normal((n, dim)).astype(np.float32)
    candidates = k + rerank_margin(k, torch.float32)
    buffers = n * threshold_plan(len(keys), candidates).capacity * 12
    least = next(b for b in range(0, 1 << 30, 4_096) if search_fits(n, dim, candidates, b, torch.float32))
    budget = least + buffers - 4_096  # topk's least and the buffers, less a little
    assert buffers <= budget // 2  # not the other rule's case: buffers over half the budget
    got = exact_search(queries, keys, k, memory_bytes=budget, selection="threshold")
    assert threshold_path["blocks"] == 0
    want = exact_search(queries, keys, k, selection="topk")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    exact_search(queries, keys, k, memory_bytes=budget + 8_192, selection="threshold")
    assert threshold_path["blocks"] > 0  # with room for both, the threshold path


def test_threshold_search_on_real_hidden_states(biomed_datastore):
    """Keys from a real LM layer, ordered by corpus position (neighbours cluster by document): the systematic sample
    still gives thresholds that hold, and the result is brute force's."""
    store = Datastore(biomed_datastore)
    k = 80
    assert threshold_plan(len(store), k + rerank_margin(k, torch.float32)) is not None  # the path runs
    queries = np.asarray(store.keys[:150], dtype=np.float32)
    want = brute_force(queries, np.asarray(store.keys), k, exclude=np.arange(150))
    assert_same_neighbours(exact_search(queries, store.keys, k, np.arange(150), selection="threshold"), want)


def test_targets_by_threshold_selection_equal_targets_by_topk(tmp_path, biomed_datastore, monkeypatch):
    """``--search.selection threshold`` reaches the search of every chunk and leaves the stored rows as they were."""
    import lightning_memdec.stages.target_searcher as targets_stage

    selections = []

    def recorded(*args, **kwargs):
        selections.append(kwargs["selection"])
        return exact_search(*args, **kwargs)

    monkeypatch.setattr(targets_stage, "exact_search", recorded)
    k = 80
    assert threshold_plan(len(Datastore(biomed_datastore)), k + rerank_margin(k, torch.float32)) is not None
    built = {
        selection: Targets(
            build_targets(
                biomed_datastore,
                None,
                tmp_path / selection,
                knn=KNNTargets(k=k, temperature=4.0),
                search=TargetSearch(backend="exact", chunk_size=1000, selection=selection),
            )
        )
        for selection in ("topk", "threshold")
    }
    assert len(built["topk"]) == len(built["threshold"]) > 2000
    chunks = -(-len(built["topk"]) // 1000)
    assert selections == ["topk"] * chunks + ["threshold"] * chunks
    for i in range(len(built["topk"])):
        for got, want in zip(built["threshold"].row(i), built["topk"].row(i)):
            np.testing.assert_array_equal(got, want)


def test_auto_takes_the_threshold_only_where_it_was_measured_faster():
    large = AUTO_MIN_KEYS_PER_CANDIDATE * 1100  # keys for k = 1,024 and its margin
    assert choose_selection("auto", "cpu", AUTO_MIN_QUERIES, large, 1100) == "threshold"
    assert choose_selection("auto", "cpu", AUTO_MIN_QUERIES - 1, large, 1100) == "topk"  # the sample does not pay
    assert choose_selection("auto", "cpu", 4096, large - 1, 1100) == "topk"  # a small store: topk was faster
    assert choose_selection("auto", "cuda", 4096, large, 1100) == "topk"  # not yet measured on a GPU
    assert choose_selection("topk", "cpu", 4096, large, 1100) == "topk"
    assert choose_selection("threshold", "cuda", 1, 10, 5) == "threshold"
    assert TargetSearch().selection == "auto"


def test_selection_is_checked():
    keys = np.zeros((10, 4), np.float16)
    with pytest.raises(ValueError, match="selection must be one of"):
        exact_search(keys, keys, 2, selection="sorted")
    with pytest.raises(ValueError, match="coarse=True"):
        exact_search(keys, keys, 2, coarse=True, selection="threshold")
    with pytest.raises(ValueError, match="--search.selection must be one of"):
        TargetSearch(selection="sorted")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_equal_the_torch_reference_under_the_interpreter():
    """tests/interpreted_triton_kernels.py in a fresh process with ``TRITON_INTERPRET=1`` (see its docstring)."""
    checks = Path(__file__).with_name("interpreted_triton_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout + run.stderr


def test_best_in_buffers_takes_smaller_ids_among_ties_whatever_the_slot_order():
    """The fused kernel fills slots in its own scheduling order; the kept set must not depend on it. Against a direct
    reference: each row's slots sorted by (score, id), empty slots (+inf, −1) last; negative, zero and tied scores."""
    g = torch.Generator().manual_seed(4)
    n, capacity, keep = 6, 40, 9
    scores = torch.randint(-3, 4, (n, capacity), generator=g).float() * 0.5  # many exact ties, both signs, ±0
    scores[0] = torch.tensor([-0.0] * 5 + [0.0] * 10 + [1.0] * 25)  # the 9 kept among 15 zeros of both signs
    ids = torch.stack([torch.randperm(10_000, generator=g)[:capacity] for _ in range(n)])
    scores[1, 30:], ids[1, 30:] = math.inf, -1  # a row not full
    counts = torch.full((n,), capacity, dtype=torch.int32)
    want = []
    for row in range(n):
        order = np.lexsort((ids[row].numpy() % 2**32, scores[row].numpy()))[:keep]
        want.append(sorted(ids[row, order].tolist()))
    for trial in range(3):
        perm = torch.stack([torch.randperm(capacity, generator=g) for _ in range(n)])
        buffers = CandidateBuffers(scores.gather(1, perm), ids.gather(1, perm), counts)
        got_scores, got_ids = best_in_buffers(buffers, keep)
        assert [sorted(r) for r in got_ids.tolist()] == want, trial
        assert torch.equal(got_scores.sort(1).values, scores.sort(1).values[:, :keep])
