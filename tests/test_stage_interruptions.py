"""The chunked stages (build-datastore, build-targets) stopped by SIGTERM, resumed over damaged chunk files, and given
a datastore whose values or keys are corrupt: each against an uninterrupted build or a clear error before any work."""

import logging
import os
import shutil
import signal

import lightning as L
import numpy as np
import pytest
from test_datastore import Interrupt, SimulatedKill

from lightning_memdec.io.artifact_dirs import ArtifactError, Interrupted, partial_dir
from lightning_memdec.io.token_corpus import Corpus, position_windows
from lightning_memdec.stages.chunk_ranges import done_ranges
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows
from lightning_memdec.stages.target_chunks import chunk_file
from lightning_memdec.stages.targets import build_targets

TARGET_FILES = ("offsets.npy", "ids.npy", "probs.npy")
STORE_FILES = ("keys.npy", "values.npy")
TARGETS = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512))
EXACT = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512, backend="exact"))
STORE = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))


class Sigterm(L.Callback):
    """Sends this process SIGTERM (as ``timeout``, ``docker stop`` or a scheduler would) after ``after`` chunks."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def on_predict_batch_end(self, *args, **kwargs):
        self.seen += 1
        if self.seen == self.after:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def reference_targets(tmp_path_factory, biomed_datastore, biomed_index):
    """An uninterrupted build: what every interrupted-then-resumed build must equal byte for byte."""
    return build_targets(biomed_datastore, biomed_index, tmp_path_factory.mktemp("ref") / "t", **TARGETS)


def same_files(a, b, names) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def corrupt_copy(store, tmp_path, name, rows, value):
    """A copy of ``store`` whose ``name`` holds ``value`` at ``rows`` (its meta.json unchanged, as damage leaves it)."""
    copy = shutil.copytree(store, tmp_path / "corrupt")
    array = np.load(copy / name, mmap_mode="r+")
    array[rows] = value
    array.flush()
    del array
    return copy


def test_sigterm_stops_build_targets_and_the_rerun_resumes(tmp_path, biomed_datastore, biomed_index,
                                                          reference_targets, capsys):  # fmt: skip
    out = tmp_path / "t"
    with pytest.raises(Interrupted) as stopped:
        build_targets(biomed_datastore, biomed_index, out, callbacks=[Sigterm(after=2)], **TARGETS)
    assert stopped.value.code == 128 + signal.SIGTERM
    said = "interrupted (SIGTERM) with 1,024 of 2,999 positions done: run the same command again to resume"
    assert said in str(stopped.value)
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert done_ranges(partial_dir(out)) == [(0, 512), (512, 1024)] and not out.exists()  # the chunks in hand saved
    build_targets(biomed_datastore, biomed_index, out, **TARGETS)
    assert same_files(out, reference_targets, TARGET_FILES)


def test_a_sigterm_just_before_prediction_starts_stops_before_any_chunk(tmp_path, biomed_datastore, biomed_index,
                                                                        reference_targets, monkeypatch):  # fmt: skip
    """SIGTERM while the loader is built: Lightning's own handler is in place then and only records it."""
    from lightning_memdec.stages.target_searcher import KNNTargetSearcher

    build_loader = KNNTargetSearcher.predict_dataloader

    def sigterm_then_build(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return build_loader(self)

    monkeypatch.setattr(KNNTargetSearcher, "predict_dataloader", sigterm_then_build)
    out = tmp_path / "t"
    with pytest.raises(Interrupted, match="with 0 of 2,999 positions done"):
        build_targets(biomed_datastore, biomed_index, out, **TARGETS)
    monkeypatch.undo()
    assert done_ranges(partial_dir(out)) == [] and not out.exists()
    build_targets(biomed_datastore, biomed_index, out, **TARGETS)
    assert same_files(out, reference_targets, TARGET_FILES)


@pytest.mark.parametrize("after", [2, -1])  # -1: after the last chunk, the signal in the run's closing steps
def test_sigterm_stops_build_datastore_and_the_rerun_resumes(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore,
                                                            after, caplog):  # fmt: skip
    """The rerun computes the chunks left, says how many were done (its progress bar counts only the rest), and
    publishes the files of an uninterrupted run."""
    out = tmp_path / "ds"
    windows = position_windows(Corpus(biomed_corpus).num_positions, 64, 32)
    after = after if after > 0 else -(-len(windows) // 4)
    with pytest.raises(Interrupted, match="run the same command again to resume"):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Sigterm(after)], **STORE)
    assert len(done_ranges(partial_dir(out))) == after and not out.exists()
    with caplog.at_level(logging.INFO, logger="lightning_memdec.stages.chunked_predict"):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, **STORE)
    size = STORE["windows"].batch_size
    chunks, done = -(-len(windows) // size), min(after * size, len(windows))
    left = f"the progress bar counts the {chunks - after} chunks left"
    said = f"resuming with {done:,} of {len(windows):,} windows done; {left}"
    assert said in caplog.text
    assert same_files(out, biomed_datastore, STORE_FILES)


def test_damaged_chunks_are_computed_again_at_resume(tmp_path, biomed_datastore, biomed_index, reference_targets,
                                                     caplog):  # fmt: skip
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, biomed_index, out, callbacks=[Interrupt(after=6)], **TARGETS)
    work = partial_dir(out)
    (chunk_file(work, (0, 512), "probs")).unlink()  # a manual cleanup
    os.truncate(chunk_file(work, (512, 1024), "ids"), 100)  # a disk error
    np.save(chunk_file(work, (1024, 1536), "probs"), np.zeros(1, np.float16))  # a file of the wrong length
    with open(chunk_file(work, (1536, 2048), "ids"), "ab") as ids:  # bytes past what its header promises
        ids.write(b"\0" * 8)
    counts = np.load(chunk_file(work, (2048, 2560), "counts"))  # one position too many, the entries still adding up
    np.save(chunk_file(work, (2048, 2560), "counts"), np.append(counts, counts.dtype.type(0)))
    widened = np.load(chunk_file(work, (2560, 2999), "ids")).astype(np.int64)
    np.save(chunk_file(work, (2560, 2999), "ids"), widened)  # ids widened
    with caplog.at_level(logging.WARNING):
        build_targets(biomed_datastore, biomed_index, out, **TARGETS)
    truncated = f"positions 512-1024: {chunk_file(work, (512, 1024), 'ids').name} is truncated"
    assert "6 finished chunks" in caplog.text and truncated in caplog.text
    assert f"positions 1536-2048: {chunk_file(work, (1536, 2048), 'ids').name} has" in caplog.text
    assert "positions 2048-2560: its counts cover 513 positions, the chunk has 512" in caplog.text
    assert "; and 1 more)" in caplog.text  # chunk 5, the widened ids: five are named
    assert same_files(out, reference_targets, TARGET_FILES)


def test_whole_chunks_and_a_short_last_one_are_kept_at_resume(tmp_path, biomed_datastore, biomed_index,
                                                              reference_targets, caplog):  # fmt: skip
    """No false alarm: a resume after every chunk was done (the last one shorter) recomputes nothing."""
    out = tmp_path / "t"
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, biomed_index, out, callbacks=[Interrupt(after=6)], **TARGETS)
    assert done_ranges(partial_dir(out)) == [(lo, min(lo + 512, 2999)) for lo in range(0, 2999, 512)]  # last: 439
    with caplog.at_level(logging.WARNING):
        build_targets(biomed_datastore, biomed_index, out, **TARGETS)
    assert "damaged" not in caplog.text
    assert same_files(out, reference_targets, TARGET_FILES)


@pytest.mark.parametrize("damage", ["missing", "truncated", "longer"])
def test_a_damaged_keys_file_is_computed_again_at_resume(tmp_path, biomed_corpus, tiny_gpt2, biomed_datastore,
                                                         damage, caplog):  # fmt: skip
    out = tmp_path / "ds"
    with pytest.raises(SimulatedKill):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, callbacks=[Interrupt(after=3)], **STORE)
    keys = partial_dir(out) / "keys.npy"
    size = keys.stat().st_size
    keys.unlink() if damage == "missing" else os.truncate(keys, size // 2 if damage == "truncated" else size + 8)
    with caplog.at_level(logging.WARNING):
        build_datastore(biomed_corpus, str(tiny_gpt2), out, **STORE)
    assert same_files(out, biomed_datastore, STORE_FILES)  # missing: not the marked chunks' rows left zero
    said = {"missing": "is missing", "truncated": "is truncated", "longer": f"has {size + 8} bytes"}[damage]
    assert f"keys.npy {said}" in caplog.text and "its 3 finished chunks are computed again" in caplog.text


@pytest.mark.parametrize("bad", [60000, 50257, -1])  # 50257: the first id past a vocabulary of 50,257
def test_values_outside_the_vocabulary_are_refused_before_any_search(tmp_path, biomed_datastore, bad):
    store = corrupt_copy(biomed_datastore, tmp_path, "values.npy", slice(100, 200), bad)
    out = tmp_path / "t"
    with pytest.raises(ArtifactError, match=rf"values.npy holds token id {bad} at position 100 .*50257 ids.*rebuild"):
        build_targets(store, out=out, **EXACT)
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_nan_keys_are_named_before_any_search(tmp_path, biomed_datastore, biomed_index, backend):
    store = corrupt_copy(biomed_datastore, tmp_path, "keys.npy", [*range(100, 110), 300], np.inf)
    keys = np.load(store / "keys.npy", mmap_mode="r+")
    keys[100:110] = np.nan
    keys.flush()
    del keys
    index = biomed_index if backend == "faiss" else None  # an index built before the damage: the queries are read
    settings = dict(knn=EXACT["knn"], search=TargetSearch(chunk_size=512, backend=backend))
    with pytest.raises(ArtifactError, match=r"keys.npy\): 11 keys are NaN or inf, the first at position 100;.*rebuild"):
        build_targets(store, index, tmp_path / "t", **settings)
    assert not list((partial_dir(tmp_path / "t") / "chunks").glob("*.ids.npy"))


def test_nan_keys_past_the_first_block_are_named_at_their_position(tmp_path, biomed_datastore):
    from lightning_memdec.io.readers import Datastore
    from lightning_memdec.stages.target_inputs import check_finite_store_keys

    store = corrupt_copy(biomed_datastore, tmp_path, "keys.npy", [1000, 1003], np.nan)
    dim = Datastore(store).dim
    with pytest.raises(ArtifactError, match=r"2 keys are NaN or inf, the first at position 1000"):
        check_finite_store_keys(Datastore(store), block_bytes=64 * dim * 2)  # blocks of 64 keys: the 16th holds them


def test_a_keys_file_of_another_shape_or_dtype_is_damage(tmp_path):
    """A resumed datastore takes its work directory's keys.npy only as a whole fp16 [entries, d] array."""
    from lightning_memdec.stages.datastore import keys_file_damage

    path = tmp_path / "keys.npy"
    for keys, damaged in ((np.zeros((299, 8), np.float16), False), (np.zeros((100, 8), np.float16), True),
                          (np.zeros((299, 8), np.float32), True), (np.zeros(299 * 8, np.float16), True)):  # fmt: skip
        np.save(path, keys)
        problem = keys_file_damage(path, 299)
        assert (problem is not None) == damaged, (keys.shape, keys.dtype)
        assert problem is None or f"holds {keys.dtype} {keys.shape}, not float16 [299, d]" in problem
