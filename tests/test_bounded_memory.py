"""Stage memory is O(chunk), not O(N): rows are read and written without leaving file pages mapped, merges stream,
and each blocked path gives the same result as the unblocked one."""

from __future__ import annotations

import sys
import tracemalloc
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from memory import mapped_rss

from lightning_memdec.io import npy_rows
from lightning_memdec.io.npy_rows import NpyAppender, create_npy, gather_rows, read_rows, write_rows
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


@pytest.fixture()
def rows_file(tmp_path):
    data = np.random.default_rng(0).standard_normal((20_000, 24)).astype(np.float16)
    np.save(tmp_path / "rows.npy", data)
    return data, np.load(tmp_path / "rows.npy", mmap_mode="r")


@linux_only
def test_rows_read_and_gathered_equal_indexing_and_leave_nothing_mapped(rows_file, monkeypatch):
    data, mapped = rows_file
    monkeypatch.setattr(npy_rows, "WINDOW_BYTES", 10 * 24 * 2)  # windows of 10 rows: thousands of short maps
    np.testing.assert_array_equal(read_rows(mapped, 123, 4567), data[123:4567])
    np.testing.assert_array_equal(read_rows(mapped, 19_990, 30_000), data[19_990:])  # clipped like a slice
    ids = np.random.default_rng(1).integers(0, len(data), size=(300, 17))  # repeats, any order
    np.testing.assert_array_equal(gather_rows(mapped, ids), data[ids])
    np.testing.assert_array_equal(gather_rows(mapped, ids[:, 0], window_bytes=1 << 30), data[ids[:, 0]])
    assert mapped_rss(mapped.filename) == 0  # every page read came through a file read or a closed map
    np.asarray(mapped[ids])  # the plain memmap gather keeps its pages: what the helpers avoid
    assert mapped_rss(mapped.filename) > 0
    np.testing.assert_array_equal(gather_rows(data, ids), data[ids])  # plain arrays are indexed directly
    with pytest.raises(IndexError, match="row ids must be in"):
        gather_rows(mapped, [0, len(data)])


def test_rows_written_in_pieces_equal_one_save(tmp_path, rows_file):
    data, _ = rows_file
    np.save(tmp_path / "whole.npy", data)
    offset = create_npy(tmp_path / "pwrite.npy", data.dtype, data.shape)
    with open(tmp_path / "pwrite.npy", "r+b") as f:
        for lo in reversed(range(0, len(data), 777)):  # any order, as ranks write
            write_rows(f.fileno(), offset, 24 * 2, lo, data[lo : lo + 777])
    stream = NpyAppender(tmp_path / "stream.npy", data.dtype, data.shape[1:], len(data))
    for lo in range(0, len(data), 999):
        stream.append(data[lo : lo + 999])
    stream.close()
    whole = (tmp_path / "whole.npy").read_bytes()
    assert (tmp_path / "pwrite.npy").read_bytes() == whole and (tmp_path / "stream.npy").read_bytes() == whole
    short = NpyAppender(tmp_path / "short.npy", data.dtype, data.shape[1:], len(data))
    short.append(data[:10])
    with pytest.raises(ValueError, match="got 10 of its 20000 rows"):
        short.close()


def test_merge_streams_chunks_in_memory_of_one_chunk(tmp_path):
    from lightning_memdec.io.readers import IDS, OFFSETS, PROBS
    from lightning_memdec.stages.chunk_ranges import mark_done
    from lightning_memdec.stages.target_chunks import CHUNKS, chunk_file, merge_chunks

    rng = np.random.default_rng(0)
    chunks = []
    (tmp_path / CHUNKS).mkdir()
    for c in range(400):  # 400 chunks of 500 positions: offsets alone are 1.6 MB, one chunk ~15 kB
        counts = rng.integers(0, 6, size=500)
        chunk = {"counts": counts, "ids": rng.integers(0, 50_000, counts.sum(), dtype=np.int32)}
        chunk["probs"] = rng.random(counts.sum()).astype(np.float16)
        for name, arr in chunk.items():
            np.save(chunk_file(tmp_path, (500 * c, 500 * c + 500), name), arr)
        mark_done(tmp_path, 500 * c, 500 * c + 500)
        chunks.append(chunk)
    tracemalloc.start()
    num_positions, nnz = merge_chunks(tmp_path, 500 * len(chunks))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    counts = np.concatenate([c["counts"] for c in chunks])
    assert (num_positions, nnz) == (200_000, counts.sum())
    np.testing.assert_array_equal(np.load(tmp_path / OFFSETS), np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(np.load(tmp_path / IDS), np.concatenate([c["ids"] for c in chunks]))
    np.testing.assert_array_equal(np.load(tmp_path / PROBS), np.concatenate([c["probs"] for c in chunks]))
    assert peak < 1_000_000, peak  # chunks and fixed overhead (~0.2 MB), not offsets (1.6 MB) nor ids + probs (3 MB)


def test_values_copied_in_blocks_equal_a_whole_copy(tmp_path):
    from lightning_memdec.stages.datastore import write_values
    from lightning_memdec.stages.target_searcher import values_on

    tokens = np.random.default_rng(0).integers(0, 50_000, 1_000_001).astype(np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    corpus = SimpleNamespace(tokens=np.load(tmp_path / "tokens.npy", mmap_mode="r"), num_tokens=len(tokens))
    corpus.num_positions = len(tokens) - 1
    tracemalloc.start()
    write_values(tmp_path / "values.npy", corpus, block=4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    values = np.load(tmp_path / "values.npy", mmap_mode="r")
    assert values.dtype == np.int32 and peak < 500_000, peak  # blocks, not the 4 MB of values
    np.testing.assert_array_equal(values, tokens[1:].astype(np.int32))
    on_cpu = values_on(values, torch.device("cpu"), block=1000)
    assert on_cpu.dtype == torch.int32 and torch.equal(on_cpu, torch.from_numpy(tokens[1:].astype(np.int32)))


class PeakMappedRSS(L.Callback):
    """Records, after every chunk, the resident bytes of the given files' maps in this (single) process."""

    def __init__(self, *paths):
        self.paths, self.peak = paths, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.peak = max(self.peak, sum(mapped_rss(p) for p in self.paths if p.exists()))


@linux_only
@pytest.mark.parametrize("search", ["faiss", "exact"])
def test_targets_leave_no_key_pages_mapped(tmp_path, biomed_datastore, biomed_index, search):
    from lightning_memdec.io.readers import KEYS, Targets
    from lightning_memdec.stages.targets import build_targets

    spy = PeakMappedRSS(biomed_datastore / KEYS)
    knn, backend = KNNTargets(k=8, temperature=4.0, exact_distances=True), TargetSearch(backend=search, chunk_size=256)
    got = Targets(
        build_targets(biomed_datastore, biomed_index, tmp_path / "t", knn=knn, search=backend, callbacks=[spy])
    )
    assert spy.peak == 0  # queries read, keys streamed and gathered by file reads or short-lived maps
    assert len(got) == len(np.load(biomed_datastore / KEYS, mmap_mode="r"))


@linux_only
def test_datastore_keys_written_without_mapping_them(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore):
    from lightning_memdec.io.artifact_dirs import partial_dir
    from lightning_memdec.stages.datastore import build_datastore

    out = tmp_path / "ds"
    spy = PeakMappedRSS(partial_dir(out) / "keys.npy", biomed_corpus / "tokens.npy")
    build_datastore(
        biomed_corpus,
        str(tiny_gpt2),
        out,
        callbacks=[spy],
        windows=Windows(window=64, stride=32, batch_size=4),
        hardware=Hardware(accelerator="cpu"),
    )
    assert spy.peak == 0
    for name in ("keys.npy", "values.npy"):  # same bytes as the session's datastore, built with the same settings
        assert (out / name).read_bytes() == (biomed_datastore / name).read_bytes()


@linux_only
def test_index_reads_keys_in_blocks_without_mapping_them(tmp_path, biomed_datastore, monkeypatch):
    import lightning_memdec.retrieval.faiss_index as index_module
    from lightning_memdec.io.readers import KEYS

    peaks = []

    def spying_tqdm(steps, **_):
        for step in steps:
            yield step
            peaks.append(mapped_rss(biomed_datastore / KEYS))

    monkeypatch.setattr(index_module, "tqdm", spying_tqdm)
    small = index_module.build_index(
        biomed_datastore, tmp_path / "small", add_batch=100, plan=IndexSettings(factory="IVF8,Flat")
    )
    monkeypatch.undo()
    whole = index_module.build_index(
        biomed_datastore, tmp_path / "whole", add_batch=10**9, plan=IndexSettings(factory="IVF8,Flat")
    )
    assert len(peaks) > 10 and max(peaks) == 0
    assert (small / "index.faiss").read_bytes() == (whole / "index.faiss").read_bytes()


def test_rows_come_from_the_file_opened_even_after_its_path_is_republished(tmp_path):
    """`memdec tokenize --overwrite` publishing a new corpus while build-datastore read the old one: reads that
    reopened the path mixed both into one datastore. Reads go to the file the stage opened."""
    import os

    from lightning_memdec.io.npy_rows import open_checked

    old, new = np.arange(40, dtype=np.int32).reshape(10, 4), -np.arange(40, dtype=np.int32).reshape(10, 4)
    for name, data in (("a", old), ("b", new)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "rows.npy", data)
    array = open_checked(tmp_path / "a", "rows.npy", (10, 4), "int32")
    os.replace(tmp_path / "a", tmp_path / "a.old")  # what publish does: the old directory out, the new one in
    os.replace(tmp_path / "b", tmp_path / "a")
    np.testing.assert_array_equal(read_rows(array, 2, 7), old[2:7])
    np.testing.assert_array_equal(gather_rows(array, [9, 0, 3, 3]), old[[9, 0, 3, 3]])
    (tmp_path / "a.old" / "rows.npy").unlink()  # deleted too: the open file still reads
    np.testing.assert_array_equal(read_rows(array, 0, 10), old)
    np.testing.assert_array_equal(read_rows(open_checked(tmp_path / "a", "rows.npy", (10, 4), "int32"), 0, 3), new[:3])


def test_a_file_cut_short_after_it_was_opened_is_an_error_not_garbage(tmp_path):
    import os

    from lightning_memdec.io.artifact_dirs import ArtifactError
    from lightning_memdec.io.npy_rows import open_checked

    np.save(tmp_path / "rows.npy", np.arange(40, dtype=np.int32).reshape(10, 4))
    array = open_checked(tmp_path, "rows.npy", (10, 4), "int32")
    os.truncate(tmp_path / "rows.npy", (tmp_path / "rows.npy").stat().st_size - 16)
    with pytest.raises(ArtifactError, match="ends before row 10: the file is truncated"):
        read_rows(array, 0, 10)


def test_a_fortran_ordered_file_is_refused_not_read_as_rows(tmp_path):
    """Rows are read as contiguous byte ranges; a Fortran-ordered file (never written here, but np.save writes one
    for a transposed array) would give columns as rows."""
    from lightning_memdec.io.artifact_dirs import ArtifactError
    from lightning_memdec.io.npy_rows import open_checked

    np.save(tmp_path / "rows.npy", np.asfortranarray(np.arange(40, dtype=np.int32).reshape(10, 4)))
    with pytest.raises(ArtifactError, match="rows.npy is truncated or corrupt .*Fortran-ordered"):
        open_checked(tmp_path, "rows.npy", (10, 4), "int32")


def test_a_file_of_another_dtype_is_refused_though_its_shape_matches(tmp_path):
    """values.npy written int64 where meta.json says int32 would be read as other numbers: refused, naming both."""
    from lightning_memdec.io.artifact_dirs import ArtifactError
    from lightning_memdec.io.npy_rows import open_checked

    np.save(tmp_path / "values.npy", np.arange(10, dtype=np.int64))
    with pytest.raises(ArtifactError, match=r"dtype int64, but meta.json says \(10,\) int32"):
        open_checked(tmp_path, "values.npy", (10,), "int32")


def test_a_stream_stopped_by_an_error_keeps_its_empty_header(tmp_path):
    """An NpyAppender left by an exception must not look whole: its file still reads as 0 rows."""
    with pytest.raises(RuntimeError, match="stopped"):
        with NpyAppender(tmp_path / "cut.npy", np.float32, (4,), 10) as stream:
            stream.append(np.ones((10, 4)))
            raise RuntimeError("stopped")
    assert np.load(tmp_path / "cut.npy").shape == (0, 4)


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float16).reshape(3, 4), np.arange(5, dtype=np.int64),
                                   np.zeros((0, 3), np.float32), np.eye(4)[:, ::2]])  # fmt: skip
def test_save_npy_writes_np_saves_bytes(tmp_path, array):
    from lightning_memdec.io.npy_rows import save_npy

    np.save(tmp_path / "want.npy", array)
    save_npy(tmp_path / "got.npy", array)
    assert (tmp_path / "got.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()


def test_a_write_the_file_size_limit_cuts_short_is_efbig_and_leaves_no_temporary_file(tmp_path):
    """numpy's short write is an OSError with no errno, which the CLI showed as a traceback, not a disk error."""
    import errno
    import resource
    import signal

    from lightning_memdec.io.npy_rows import save_npy

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as under `ulimit -f`
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(OSError) as failed:
            save_npy(tmp_path / "big.npy", np.zeros(10_000, np.float32))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert failed.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []
