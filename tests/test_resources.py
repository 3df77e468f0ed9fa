"""Runs that would not fit this machine (RAM, disk, search budget, faiss-gpu's k) are refused before any work, with
an error that names the bytes and the setting that fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_memdec.io.artifact_dirs import partial_dir
from lightning_memdec.io.capacity import ResourceError, check_fits
from lightning_memdec.retrieval.index_plan import check_gpu_k
from lightning_memdec.retrieval.search_budget import block_rows, check_search_budget
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows
from lightning_memdec.stages.targets import build_targets


def test_check_fits_names_bytes_and_fix():
    check_fits(2**30, 2**30, "x", "fix")
    with pytest.raises(ResourceError, match=r"x needs 2.00 GiB but only 1.00 GiB is available; do less"):
        check_fits(2 * 2**30, 2**30, "x", "do less")
    with pytest.raises(ResourceError, match=r"x needs 10.5 MiB but only 10.0 MiB is available"):  # both "0.01 GiB"
        check_fits(11 * 2**20 - 2**19, 10 * 2**20, "x", "do less")


def test_search_budget_error_gives_a_chunk_size_that_fits():
    budget, dim, candidates = 64 * 2**20, 1600, 1024 + 8 + 1024 // 16  # the paper's k and d on the CPU (fp32)
    with pytest.raises(ValueError, match=r"use --search.chunk_size ≤ ([\d,]+) or --search.memory_gb ≥") as err:
        check_search_budget(4096, dim, candidates, budget, torch.float32)
    fits = int(err.value.args[0].split("chunk_size ≤ ")[1].split(" ")[0].replace(",", ""))
    check_search_budget(fits, dim, candidates, budget, torch.float32)  # the suggestion fits …
    assert block_rows(fits, dim, candidates, budget, torch.float32) >= 1
    with pytest.raises(ValueError):  # … and is the largest that does
        check_search_budget(fits + 1, dim, candidates, budget, torch.float32)
    with pytest.raises(ValueError, match="not even one query fits: lower k"):
        check_search_budget(1, dim, 2 * 10**6, budget, torch.float32)  # 96 MB of top-k for one query


def test_build_targets_refuses_a_budget_too_small_before_work(tmp_path, biomed_datastore):
    from lightning_memdec.stages.targets import build_targets

    with pytest.raises(ValueError, match="use --search.chunk_size ≤"):
        build_targets(
            biomed_datastore,
            None,
            tmp_path / "t",
            knn=KNNTargets(k=16),
            search=TargetSearch(backend="exact", memory_gb=1e-05),
        )
    assert not partial_dir(tmp_path / "t").exists()


def test_build_targets_refuses_replicas_beyond_ram(tmp_path, biomed_datastore, biomed_index, monkeypatch):
    import lightning_memdec.stages.targets as targets

    monkeypatch.setattr(targets, "available_ram", lambda: 1000)
    with pytest.raises(ResourceError, match="2 ranks' FAISS index replicas in RAM.*--hardware.devices lower"):
        targets.build_targets(
            biomed_datastore,
            biomed_index,
            tmp_path / "t",
            knn=KNNTargets(k=8),
            search=TargetSearch(backend="faiss"),
            hardware=Hardware(devices=2),
        )
    with pytest.raises(ResourceError, match="2 ranks' exact-search blocks"):
        targets.build_targets(
            biomed_datastore,
            None,
            tmp_path / "t",
            knn=KNNTargets(k=8),
            search=TargetSearch(backend="exact"),
            hardware=Hardware(devices=2),
        )
    assert not partial_dir(tmp_path / "t").exists()


def test_build_index_refuses_an_index_beyond_ram(tmp_path, biomed_datastore, monkeypatch):
    import lightning_memdec.retrieval.faiss_index as index

    monkeypatch.setattr(index, "available_ram", lambda: 1000)
    refused = r"building IVF8,Flat \(in RAM: index \+ training sample\).*--plan.memory_gb"
    with pytest.raises(ResourceError, match=refused):
        index.build_index(biomed_datastore, tmp_path / "i", plan=IndexSettings(factory="IVF8,Flat"))
    assert not partial_dir(tmp_path / "i").exists()


def test_build_datastore_refuses_a_full_disk(tmp_path, biomed_corpus, tiny_gpt2, monkeypatch):
    import lightning_memdec.stages.datastore as datastore

    monkeypatch.setattr(datastore, "free_disk", lambda path: 10_000)
    with pytest.raises(ResourceError, match=r"positions × 32 dims \(keys fp16 \+ values int32\).*larger file system"):
        datastore.build_datastore(biomed_corpus, str(tiny_gpt2), tmp_path / "ds", windows=Windows(window=64, stride=32))
    assert not partial_dir(tmp_path / "ds").exists()


def test_gpu_k_limit_counts_the_self_match():
    check_gpu_k(2048)
    check_gpu_k(2047, self_match=True)
    with pytest.raises(ValueError, match=r"k=2048 \(\+ 1 for the query's own entry.*use k ≤ 2047"):
        check_gpu_k(2048, self_match=True)


def test_build_targets_refuses_a_disk_too_small_for_one_entry_a_position_before_work(tmp_path, biomed_datastore,
                                                                                     monkeypatch):  # fmt: skip
    import lightning_memdec.stages.targets_disk as targets_disk
    from lightning_memdec.io.readers import Datastore

    n = len(Datastore(biomed_datastore))
    assert targets_disk.targets_disk_bytes(n, 8) == targets_disk_bytes_for(n, 8)
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, 1) - 1)
    with pytest.raises(ResourceError, match=rf"targets for {n:,} positions .* at 1 entry a position, needs"):
        build_targets(biomed_datastore, None, tmp_path / "t", knn=KNNTargets(k=8), search=TargetSearch(backend="exact"))
    assert not partial_dir(tmp_path / "t").exists()
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, 1))
    targets_disk.check_disk(tmp_path / "t", n, 1)  # exactly enough is enough


def test_a_disk_short_of_the_worst_case_warns_and_the_measured_support_decides(tmp_path, biomed_datastore,
                                                                               monkeypatch, caplog):  # fmt: skip
    """k entries a position is the worst case, rarely the run's: short of it, the run goes on (a warning) and is
    stopped after its first chunk when the support it measured says the rest will not fit; its chunk is kept, and
    the same command with the space resumes to the targets of an uninterrupted run. Where the measured support fits,
    it runs to the end."""
    import lightning_memdec.stages.targets_disk as targets_disk
    from lightning_memdec.io.readers import Datastore, Targets
    from lightning_memdec.stages.chunk_ranges import done_ranges

    n, k = len(Datastore(biomed_datastore)), 16
    settings = dict(knn=KNNTargets(k=k), search=TargetSearch(backend="exact", chunk_size=512))
    reference = Targets(build_targets(biomed_datastore, None, tmp_path / "reference", **settings))
    support = len(reference.ids) / n
    assert 2 < support < k - 1  # the guard: the worst case is far from the run's
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, 2))
    with pytest.raises(ResourceError, match=r"at the \d+\.\d entries a position measured over 512 positions, the rest"):
        build_targets(biomed_datastore, None, tmp_path / "t", **settings)
    assert "the run goes on, and stops (resumable)" in caplog.text
    assert done_ranges(partial_dir(tmp_path / "t")) == [(0, 512)]  # the chunk searched is saved, not lost
    from lightning_memdec.io.capacity import allocated_bytes

    written = sum(allocated_bytes(f) for f in partial_dir(tmp_path / "t").rglob("*") if f.is_file())
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, 1) - written)
    targets_disk.check_disk(tmp_path / "t", n, k)  # what the stopped run wrote counts as written
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, k - 1))
    resumed = Targets(build_targets(biomed_datastore, None, tmp_path / "t", **settings))
    for name in ("offsets", "ids", "probs"):
        assert np.array_equal(getattr(resumed, name), getattr(reference, name))


def test_the_disk_watch_projects_every_rank_s_chunks_left_and_the_merged_copy_at_the_measured_support(
    tmp_path, monkeypatch
):
    """Rank r of 2, after its 4th of 10 chunks of 100 positions (2 more may still be saving): 6 + 2 chunks of its own
    to come, as many of the other rank's, then the merged CSR of all 2,000 positions, at 2.5 entries a position."""
    from types import SimpleNamespace

    import lightning_memdec.stages.targets_disk as targets_disk

    n, chunk = 2_000, 100
    watch = targets_disk.TargetsDiskWatch(tmp_path, n, chunk, unsaved=2)
    trainer = SimpleNamespace(num_predict_batches=[10], world_size=2)
    counts = [np.full(chunk, 2), np.full(chunk, 3), np.full(chunk, 2), np.full(chunk, 3)]  # a mean of 2.5
    left = (10 - 3 - 1 + 2) * 2 * chunk  # positions whose chunks are not on disk yet
    needed = (left * 2.5 * 6 + 8 * (left + 1)) + (n * 2.5 * 6 + 8 * (n + 1))
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: 2 * needed)
    for batch_idx, c in enumerate(counts[:3]):
        watch.on_predict_batch_end(trainer, None, {"counts": c}, None, batch_idx)
    watch.on_predict_batch_end(trainer, None, None, None, 3)  # an idle step measures nothing
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: needed)
    watch.on_predict_batch_end(trainer, None, {"counts": counts[3]}, None, 3)  # exactly enough is enough
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: needed - 1)
    watch.positions, watch.entries = 300, 700  # as before the 4th chunk
    with pytest.raises(ResourceError, match="at the 2.5 entries a position measured over 400 positions"):
        watch.on_predict_batch_end(trainer, None, {"counts": counts[3]}, None, 3)


def targets_disk_bytes_for(n: int, support: int) -> int:
    return 2 * (n * support * 6 + 8 * (n + 1))


def test_available_ram_is_the_kernel_s_memavailable_in_bytes():
    """The RAM checks compare bytes: MemAvailable is in KiB in /proc/meminfo (read here directly)."""
    from lightning_memdec.io.capacity import available_ram

    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(available_ram() - kib * 1024) < 0.05 * kib * 1024  # memory moves a little between the two reads


def test_allocated_bytes_count_what_a_sparse_file_holds_not_its_size(tmp_path):
    """A resumed datastore's keys file is sparse: the disk check subtracts the blocks written, not the length."""
    from lightning_memdec.io.capacity import allocated_bytes

    sparse = tmp_path / "keys.npy"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB long, nothing written
        f.seek(0)
        f.write(b"x" * 4096)
    assert 4096 <= allocated_bytes(sparse) < 1 << 20  # the written block, not the 1 GiB length
    assert allocated_bytes(tmp_path / "absent") == 0


def test_a_memory_budget_of_nothing_is_refused_and_bf16_keeps_the_wider_rerank_margin():
    """A zero budget is no budget (refused, as a negative one); bf16 products are coarser than fp32's, so the exact
    re-ranking keeps more candidates for them, at every k."""
    from lightning_memdec.retrieval.search_budget import memory_budget, rerank_margin

    for nothing in (0, -1):
        with pytest.raises(ValueError, match="must be positive"):
            memory_budget("cpu", nothing)
    assert memory_budget("cpu", 1) == 1
    for k in (1, 16, 64, 1024):
        assert rerank_margin(k, torch.bfloat16) > rerank_margin(k, torch.float32) >= 1


def test_with_shard_keys_the_worst_case_must_fit_before_any_search(tmp_path, biomed_datastore, monkeypatch):
    """With --search.shard_keys every rank searches every chunk together: one rank's stop would leave the others
    waiting in the next chunk's collectives, so the run is not watched and the worst case is checked up front."""
    import lightning_memdec.stages.targets_disk as targets_disk
    from lightning_memdec.io.readers import Datastore

    n, k = len(Datastore(biomed_datastore)), 8
    monkeypatch.setattr(targets_disk, "free_disk", lambda path: targets_disk_bytes_for(n, k) - 1)
    with pytest.raises(ResourceError, match=f"at {k} entries a position, needs .*lower --knn.max_support"):
        build_targets(biomed_datastore, None, tmp_path / "t", knn=KNNTargets(k=k),
                      search=TargetSearch(backend="exact", shard_keys=True))  # fmt: skip
    assert not partial_dir(tmp_path / "t").exists()
    targets_disk.check_disk(tmp_path / "t", n, k)  # watched, the same disk is enough to start
