"""A stopped build-targets or build-datastore resumed with another chunk size (what a user lowers after a CUDA OOM):
every finished chunk is kept (progress is recorded by item range), and the result equals a one-shot run's within
floating-point tolerance (the rows left are computed by batches of other shapes). A run an earlier version started
(markers and chunk files named by chunk number) resumes too, even one killed while being converted; the merge refuses
finished ranges that do not tile the positions."""

import json
import logging
import os

import numpy as np
import pytest
from test_datastore import Interrupt, SimulatedKill

from lightning_memdec.io.artifact_dirs import RUN_CONFIG, ArtifactError, partial_dir
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.io.token_corpus import Corpus, position_windows
from lightning_memdec.stages.chunk_ranges import (
    done_ranges,
    mark_done,
    pending_chunks,
    progress_dir,
    range_name,
    tiling_problem,
)
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows
from lightning_memdec.stages.target_chunks import PIECES, chunk_file, drop_damaged_chunks, merge_chunks
from lightning_memdec.stages.targets import build_targets

KNN = KNNTargets(k=16, temperature=4.0)
SIZE = 512  # the stopped run's chunk size
STORE_WINDOWS = 4  # the stopped datastore's windows a chunk (the biomed_datastore fixture's)


def targets_settings(chunk_size: int) -> dict:
    return dict(knn=KNN, search=TargetSearch(backend="exact", chunk_size=chunk_size))


def store_settings(batch_size: int) -> dict:
    return dict(windows=Windows(window=64, stride=32, batch_size=batch_size), hardware=Hardware(accelerator="cpu"))


@pytest.fixture(scope="module")
def one_shot_targets(tmp_path_factory, biomed_datastore):
    """An uninterrupted build at the stopped run's chunk size: the reference."""
    return Targets(
        build_targets(biomed_datastore, None, tmp_path_factory.mktemp("one-shot") / "t", **targets_settings(SIZE))
    )


def assert_targets_match(out, reference: Targets) -> None:
    """Ids and row lengths equal; probabilities within fp16 rounding (BLAS may block other batch shapes otherwise)."""
    got = Targets(out)
    np.testing.assert_array_equal(got.offsets, reference.offsets)
    np.testing.assert_array_equal(got.ids, reference.ids)
    np.testing.assert_allclose(got.probs.astype(np.float32), reference.probs.astype(np.float32), rtol=2e-3, atol=1e-4)


def assert_store_matches(out, reference) -> None:
    """Values equal; keys within a small tolerance of fp16 keys computed by forward passes of other batch shapes."""
    got, want = Datastore(out), Datastore(reference)
    np.testing.assert_array_equal(got.values, want.values)
    keys, ref = np.asarray(got.keys, dtype=np.float32), np.asarray(want.keys, dtype=np.float32)
    np.testing.assert_allclose(keys, ref, rtol=5e-3, atol=5e-3)


def test_the_work_left_is_each_gap_cut_from_its_start():
    done = [(0, 512), (1024, 1536)]
    assert pending_chunks(2999, 300, done) == [(512, 812), (812, 1024), (1536, 1836), (1836, 2136), (2136, 2436),
                                               (2436, 2736), (2736, 2999)]  # fmt: skip
    assert pending_chunks(2999, 1000, done) == [(512, 1024), (1536, 2536), (2536, 2999)]
    same = pending_chunks(2999, 512, done)  # the finished chunks' size: the chunks an uninterrupted run computes
    assert same == [(lo, min(lo + 512, 2999)) for lo in range(512, 2999, 512) if lo != 1024]
    assert pending_chunks(10, 4, [(0, 6), (3, 8)]) == [(8, 10)]  # overlapping ranges cover their union
    assert pending_chunks(10, 4, []) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("resumed_size", [200, 1000])  # smaller and larger than the stopped run's 512
def test_build_targets_resumed_with_another_chunk_size_keeps_its_chunks(tmp_path, biomed_datastore, one_shot_targets,
                                                                      resumed_size):  # fmt: skip
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=3)], **targets_settings(SIZE))
    done = done_ranges(partial_dir(out))
    assert done == [(0, 512), (512, 1024), (1024, 1536)]
    counted = Interrupt(after=10**9)  # counts the chunks the resumed run computes
    build_targets(biomed_datastore, None, out, callbacks=[counted], **targets_settings(resumed_size))
    assert counted.seen == len(pending_chunks(2999, resumed_size, done))  # the three finished chunks were kept
    assert_targets_match(out, one_shot_targets)


def test_a_resume_with_another_size_then_a_third_merges_every_range_in_order(tmp_path, biomed_datastore,
                                                                            one_shot_targets):  # fmt: skip
    """Ranges of three sizes, not aligned to each other, in one output."""
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=2)], **targets_settings(SIZE))
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=2)], **targets_settings(300))
    assert done_ranges(partial_dir(out)) == [(0, 512), (512, 1024), (1024, 1324), (1324, 1624)]
    build_targets(biomed_datastore, None, out, **targets_settings(700))
    assert_targets_match(out, one_shot_targets)


@pytest.mark.parametrize("resumed_size", [3, 9])  # smaller and larger than the stopped run's 4 windows
def test_build_datastore_resumed_with_another_batch_size_keeps_its_chunks(tmp_path, biomed_corpus, tiny_gpt2,
                                                                        biomed_datastore, resumed_size):  # fmt: skip
    out = tmp_path / "ds"
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=3)], **store_settings(4))
    done = done_ranges(partial_dir(out))
    assert done == [(0, 4), (4, 8), (8, 12)]
    counted = Interrupt(after=10**9)
    build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[counted], **store_settings(resumed_size))
    windows = len(position_windows(Corpus(biomed_corpus).num_positions, 64, 32))
    assert counted.seen == len(pending_chunks(windows, resumed_size, done))
    assert_store_matches(out, biomed_datastore)


def as_an_earlier_version_left_it(work, size_setting: str, size: int, files: bool) -> list[int]:
    """Rewrite a stopped run's work directory as the previous version wrote it: a marker per finished chunk NUMBER
    (zero-padded to 9 digits), its chunk files named so too, its chunk size recorded. Returns the numbers."""
    numbers = []
    for start, stop in done_ranges(work):
        number = start // size
        if files:
            for piece in PIECES:
                os.replace(chunk_file(work, (start, stop), piece), work / "chunks" / f"{number:09d}.{piece}.npy")
        (progress_dir(work) / range_name(start, stop)).rename(progress_dir(work) / f"{number:09d}")
        numbers.append(number)
    recorded = json.loads((work / RUN_CONFIG).read_text())
    (work / RUN_CONFIG).write_text(json.dumps(recorded | {size_setting: size}))
    return numbers


def test_a_run_an_earlier_version_started_resumes_with_another_chunk_size(tmp_path, biomed_datastore,
                                                                         one_shot_targets, caplog):  # fmt: skip
    """Killed in the middle of its conversion too: chunk 0 with one file moved, chunk 1 with its range marked but
    its number marker not yet removed. Every finished chunk is kept all the same."""
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=3)], **targets_settings(SIZE))
    work = partial_dir(out)
    assert as_an_earlier_version_left_it(work, "chunk_size", SIZE, files=True) == [0, 1, 2]
    os.replace(work / "chunks" / "000000000.counts.npy", chunk_file(work, (0, 512), "counts"))  # killed mid-move
    for piece in PIECES:  # killed after marking the range, before removing the number marker
        os.replace(work / "chunks" / f"000000001.{piece}.npy", chunk_file(work, (512, 1024), piece))
    mark_done(work, 512, 1024)
    counted = Interrupt(after=10**9)
    with caplog.at_level(logging.WARNING):
        build_targets(biomed_datastore, None, out, callbacks=[counted], **targets_settings(256))
    assert "damaged" not in caplog.text
    assert counted.seen == len(pending_chunks(2999, 256, [(0, 1536)]))
    assert_targets_match(out, one_shot_targets)


def test_a_datastore_an_earlier_version_started_resumes_with_another_batch_size(tmp_path, biomed_corpus, tiny_gpt2,
                                                                               biomed_datastore):  # fmt: skip
    out = tmp_path / "ds"
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=3)], **store_settings(4))
    assert as_an_earlier_version_left_it(partial_dir(out), "batch_windows", 4, files=False) == [0, 1, 2]
    counted = Interrupt(after=10**9)
    build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[counted], **store_settings(5))
    windows = len(position_windows(Corpus(biomed_corpus).num_positions, 64, 32))
    assert counted.seen == len(pending_chunks(windows, 5, [(0, 12)]))
    assert_store_matches(out, biomed_datastore)


def saved_chunks(work, spans) -> None:
    """Whole chunk files for ``spans`` (one entry a position), each marked done."""
    (work / "chunks").mkdir(exist_ok=True)
    for start, stop in spans:
        arrays = {"counts": np.ones(stop - start, np.int64), "ids": np.arange(start, stop, dtype=np.int32)}
        arrays["probs"] = np.ones(stop - start, np.float16)
        for piece, array in arrays.items():
            np.save(chunk_file(work, (start, stop), piece), array)
        mark_done(work, start, stop)


@pytest.mark.parametrize(
    ("spans", "said"),
    [
        ([(0, 10), (15, 30)], "a gap at item 10: a chunk ends at 10, the next runs 15-30"),
        ([(0, 10), (5, 20), (20, 30)], "an overlap at item 5: a chunk ends at 10, the next runs 5-20"),
        ([(0, 10), (10, 20)], "the chunks end at item 20, not at the 30 items"),
    ],
)
def test_the_merge_refuses_ranges_that_do_not_tile_the_positions(tmp_path, spans, said):
    saved_chunks(tmp_path, spans)
    assert tiling_problem(done_ranges(tmp_path), 30) == said
    with pytest.raises(ArtifactError, match=f"do not cover the 30 query positions once each \\({said}\\)"):
        merge_chunks(tmp_path, 30)
    assert not (tmp_path / "offsets.npy").exists()


def test_the_merge_joins_ranges_of_several_sizes_in_order(tmp_path):
    saved_chunks(tmp_path, [(20, 30), (0, 7), (7, 20)])
    assert merge_chunks(tmp_path, 30) == (30, 30)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), np.arange(30))
    np.testing.assert_array_equal(np.load(tmp_path / "offsets.npy"), np.arange(31))


def test_a_resume_drops_a_range_overlapping_an_earlier_one_or_past_the_end(tmp_path, caplog):
    """Markers from outside: the resume computes those positions again, where the merge would refuse them."""
    saved_chunks(tmp_path, [(0, 10), (5, 15), (10, 20), (20, 40)])
    with caplog.at_level(logging.WARNING):
        assert drop_damaged_chunks(tmp_path, 30) == [(5, 15), (20, 40)]
    assert "positions 5-15: it overlaps a chunk ending at 10" in caplog.text
    assert "positions 20-40: it ends past the last position, 30" in caplog.text
    assert done_ranges(tmp_path) == [(0, 10), (10, 20)]
    assert not chunk_file(tmp_path, (5, 15), "ids").exists()


def test_an_earlier_version_s_short_last_chunk_converts_to_its_range(tmp_path, caplog):
    """Chunk c of size 512 is items [512c, min(512(c+1), N)): the last, short one ends at N, so it is kept, not
    dropped as past the end and computed again."""
    from lightning_memdec.stages.chunk_ranges import convert_number_markers

    progress_dir(tmp_path).mkdir()
    for number in range(6):
        (progress_dir(tmp_path) / f"{number:09d}").touch()
    with caplog.at_level(logging.WARNING):
        convert_number_markers(tmp_path, 512, 2999)
    assert done_ranges(tmp_path) == [(lo, min(lo + 512, 2999)) for lo in range(0, 2999, 512)]
    assert sorted(os.listdir(progress_dir(tmp_path))) == [range_name(a, b) for a, b in done_ranges(tmp_path)]
    assert "cannot be placed" not in caplog.text


def test_a_sharded_index_build_an_earlier_version_started_resumes_to_the_one_process_index(tmp_path, biomed_datastore):
    """Its shards and markers named by chunk number: renamed to their ranges, the rest added, the same index file
    as `build-index`'s (a shard left under its number was not found by the merge)."""
    from lightning_memdec.io.readers import INDEX
    from lightning_memdec.retrieval.faiss_index import build_index
    from lightning_memdec.retrieval.settings import IndexSettings
    from lightning_memdec.stages.index_shards import SHARDS, build_index_sharded, shard_path

    settings = dict(plan=IndexSettings(factory="IVF16,Flat", train_size=800), recall_queries=16, recall_k=8)
    out, chunk = tmp_path / "sharded", 700
    with pytest.raises(SimulatedKill):
        build_index_sharded(biomed_datastore, out, chunk_keys=chunk, callbacks=[Interrupt(after=2)], **settings)
    work = partial_dir(out)
    for start, stop in done_ranges(work):
        os.replace(shard_path(work, (start, stop)), work / SHARDS / f"{start // chunk:09d}.faissindex")
        (progress_dir(work) / range_name(start, stop)).rename(progress_dir(work) / f"{start // chunk:09d}")
    assert sorted(os.listdir(progress_dir(work))) == ["000000000", "000000001"]
    sharded = build_index_sharded(biomed_datastore, out, chunk_keys=chunk, **settings)
    one = build_index(biomed_datastore, tmp_path / "one", **settings)
    assert (sharded / INDEX).read_bytes() == (one / INDEX).read_bytes()


def test_a_range_one_past_the_end_is_dropped_and_overlapping_markers_do_not_hide_a_gap(tmp_path):
    """A range ending at N + 1 is past the end (the merge would refuse it); and two overlapping ranges whose lengths
    sum to N leave items unfinished, which the stage's last check must see (not a count of marked items)."""
    from lightning_memdec.stages.chunked_predict import finish_chunks

    saved_chunks(tmp_path, [(0, 10), (10, 31)])
    assert drop_damaged_chunks(tmp_path, 30) == [(10, 31)]
    work = tmp_path / "overlapping"
    work.mkdir()
    for span in [(0, 700), (500, 1200)]:  # 1,400 marked items, 1,200 covered
        mark_done(work, *span)
    with pytest.raises(RuntimeError, match="200 of 1,400 positions are unfinished"):
        finish_chunks(work, 1400, "positions")


def test_a_damaged_chunk_of_an_earlier_version_s_run_is_computed_again(tmp_path, biomed_datastore, one_shot_targets,
                                                                       caplog):  # fmt: skip
    """Converted first, then checked: a truncated chunk file of the earlier version's run is found at the resume and
    its positions searched again (not found by the merge, after the whole search)."""
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, None, out, callbacks=[Interrupt(after=3)], **targets_settings(SIZE))
    work = partial_dir(out)
    as_an_earlier_version_left_it(work, "chunk_size", SIZE, files=True)
    damaged = work / "chunks" / "000000002.ids.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    counted = Interrupt(after=10**9)
    with caplog.at_level(logging.WARNING):
        build_targets(biomed_datastore, None, out, callbacks=[counted], **targets_settings(SIZE))
    assert "positions 1024-1536" in caplog.text and "damaged" in caplog.text
    assert counted.seen == len(pending_chunks(2999, SIZE, [(0, 1024)]))
    assert_targets_match(out, one_shot_targets)


def test_the_merge_refuses_a_chunk_whose_rows_are_not_its_range_s(tmp_path):
    """Counts of 9 rows under a marker of 10 positions (a file replaced from outside): the row count is checked at
    the merge too, before anything is written, naming the file."""
    saved_chunks(tmp_path, [(0, 10), (10, 30)])
    np.save(chunk_file(tmp_path, (0, 10), "counts"), np.ones(9, np.int64))
    with pytest.raises(ArtifactError, match=r"000000000000-000000000010\.counts\.npy holds 9 rows, not 10"):
        merge_chunks(tmp_path, 30)
    assert not (tmp_path / "offsets.npy").exists()


def test_a_damaged_keys_file_of_an_earlier_version_s_datastore_run_is_found_at_the_resume(tmp_path, biomed_corpus,
                                                                                          tiny_gpt2, biomed_datastore,
                                                                                          caplog):  # fmt: skip
    """Its markers converted first, then the keys file checked: cut short, every chunk is computed again (with a
    warning), not skipped with its rows left zero."""
    out = tmp_path / "ds"
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=3)], **store_settings(4))
    work = partial_dir(out)
    as_an_earlier_version_left_it(work, "batch_windows", 4, files=False)
    keys = work / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, **store_settings(4))
    assert "its 3 finished chunks are computed again" in caplog.text
    assert_store_matches(out, biomed_datastore)
