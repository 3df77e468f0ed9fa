import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny
from test_datastore import HostOutputsOnly, Interrupt, SimulatedKill

from lightning_memdec.io.artifact_dirs import ArtifactError, partial_dir
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.io.token_corpus import tokenize
from lightning_memdec.retrieval.settings import IndexSettings
from lightning_memdec.stages.chunk_ranges import done_ranges, range_name
from lightning_memdec.stages.datastore import build_datastore
from lightning_memdec.stages.settings import Hardware, KNNTargets, TargetSearch, Windows
from lightning_memdec.stages.targets import build_targets


def brute_force_row(keys, values, q, k, temperature, exclude):
    """The paper's maths, written plainly for one query: the store's key ``q``, or a key vector of another store."""
    query = keys[q] if np.ndim(q) == 0 else q
    d = ((keys - query) ** 2).sum(-1).astype(np.float64)
    if exclude is not None:
        d[exclude] = np.inf
    nn = np.argsort(d, kind="stable")[:k]
    w = np.exp(-(d[nn] - d[nn].min()) / temperature)
    w /= w.sum()
    dist = {}
    for j, wj in zip(nn, w):
        dist[int(values[j])] = dist.get(int(values[j]), 0.0) + wj
    return dist


@pytest.fixture(scope="module")
def biomed_targets(tmp_path_factory, biomed_datastore, biomed_index):
    out = tmp_path_factory.mktemp("targets") / "t"
    return build_targets(
        biomed_datastore, biomed_index, out, knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512)
    )


@pytest.mark.parametrize("temperature", [4.0, 50.0])
def test_targets_equal_brute_force_with_self_exclusion(
    tmp_path, biomed_datastore, biomed_index, biomed_targets, temperature
):
    path = (
        biomed_targets
        if temperature == 4.0
        else build_targets(
            biomed_datastore,
            biomed_index,
            tmp_path / "t",
            knn=KNNTargets(k=16, temperature=temperature),
            search=TargetSearch(chunk_size=512),
        )
    )
    store, targets = Datastore(biomed_datastore), Targets(path)
    keys = np.asarray(store.keys, dtype=np.float32)
    assert len(targets) == len(store) and targets.meta["self_excluded"]
    for q in [0, 1, 500, 1234, len(store) - 1]:
        ids, probs = targets.row(q)
        ref = brute_force_row(keys, store.values, q, 16, temperature, exclude=q)
        got = dict(zip(ids.tolist(), probs.astype(np.float64).tolist()))
        assert set(got) == set(ref), (q, got, ref)
        for tok in ref:
            assert got[tok] == pytest.approx(ref[tok], abs=2e-3)
        assert np.all(np.diff(probs.astype(np.float32)) <= 0)
    sums = np.add.reduceat(np.asarray(targets.probs, dtype=np.float64), np.asarray(targets.offsets[:-1]))
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)


def test_temperature_changes_sharpness(tmp_path, biomed_datastore, biomed_index, biomed_targets):
    hot = Targets(
        build_targets(biomed_datastore, biomed_index, tmp_path / "hot", knn=KNNTargets(k=16, temperature=1000.0))
    )
    cold = Targets(biomed_targets)
    top = lambda t: np.mean([t.row(i)[1][0] for i in range(0, len(t), 50)], dtype=np.float64)
    assert top(cold) > top(hot)


def test_truncation_renormalises(tmp_path, biomed_datastore, biomed_index):
    t = Targets(
        build_targets(
            biomed_datastore, biomed_index, tmp_path / "t", knn=KNNTargets(k=16, temperature=50.0, max_support=3)
        )
    )
    counts = np.diff(t.offsets)
    assert counts.max() <= 3 and counts.min() >= 1
    sums = np.add.reduceat(np.asarray(t.probs, dtype=np.float64), np.asarray(t.offsets[:-1]))
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)


def test_validation_queries_are_not_self_excluded(tmp_path, biomed_datastore, biomed_index, tiny_gpt2):
    valid = tokenize(["embedded:biomed/test"], tmp_path / "vc", "gpt2", max_tokens=700)
    vstore = build_datastore(
        valid,
        str(tiny_gpt2),
        tmp_path / "vds",
        windows=Windows(window=64, stride=32),
        hardware=Hardware(accelerator="cpu"),
    )
    t = Targets(
        build_targets(
            biomed_datastore, biomed_index, tmp_path / "t", queries=vstore, knn=KNNTargets(k=8, temperature=4.0)
        )
    )
    assert len(t) == 699 and not t.meta["self_excluded"]
    store, q = Datastore(biomed_datastore), Datastore(vstore)
    keys = np.asarray(store.keys, dtype=np.float32)
    d = ((keys - np.asarray(q.keys[3], dtype=np.float32)) ** 2).sum(-1)
    nearest = np.argsort(d, kind="stable")[:8]
    assert set(t.row(3)[0].tolist()) == set(store.values[nearest].tolist())


def test_queries_of_another_store_keep_a_store_entry_equal_to_their_key(
    tmp_path, biomed_corpus, biomed_datastore, biomed_index, tiny_gpt2
):
    """Queries from another store (here the same corpus in other windows: another identity, the first window's keys
    the store's own) are not self-excluded: store entry q, at distance ~0 from query q, must stay among the
    neighbours. Excluding entry q of the store for the q-th query of another store dropped an unrelated entry."""
    vstore = build_datastore(
        biomed_corpus,
        str(tiny_gpt2),
        tmp_path / "vds",
        windows=Windows(window=64, stride=64, batch_size=4),
        hardware=Hardware(accelerator="cpu"),
    )
    store, queries = Datastore(biomed_datastore), Datastore(vstore)
    assert queries.identity() != store.identity()
    t = Targets(build_targets(biomed_datastore, biomed_index, tmp_path / "t", queries=vstore, knn=KNNTargets(k=8)))
    assert not t.meta["self_excluded"]
    keys = np.asarray(store.keys, dtype=np.float32)
    for q in (0, 5, 40, 63):
        query = np.asarray(queries.keys[q], dtype=np.float32)
        assert ((keys - query) ** 2).sum(-1).argmin() == q  # the store's key for this position is this query's nearest
        want = brute_force_row(keys, store.values, query, 8, KNNTargets().temperature, exclude=None)
        ids, probs = t.row(q)
        got = dict(zip(ids.tolist(), probs.astype(np.float64).tolist()))
        assert got.keys() == want.keys() and all(abs(got[i] - want[i]) < 2e-3 for i in want), q


def test_k_is_capped_at_store_size(tmp_path, biomed_datastore, biomed_index, caplog):
    t = Targets(
        build_targets(
            biomed_datastore,
            biomed_index,
            tmp_path / "t",
            knn=KNNTargets(k=10**6, temperature=16.0),
            search=TargetSearch(chunk_size=2048),
        )
    )
    assert t.meta["k"] == len(Datastore(biomed_datastore)) - 1
    assert "exceeds" in caplog.text


def test_resume_after_kill_gives_identical_bytes(tmp_path, biomed_datastore, biomed_index, biomed_targets, monkeypatch):
    out = tmp_path / "t"
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512))
    import lightning_memdec.stages.target_chunks as target_chunks

    save = target_chunks.save_npy
    monkeypatch.setattr(target_chunks, "save_npy", lambda *a: time.sleep(0.5) or save(*a))  # saves still running...
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, biomed_index, out, callbacks=[Interrupt(after=2)], **kwargs)
    assert partial_dir(out).exists() and not out.exists()
    assert done_ranges(partial_dir(out)) == [(0, 512), (512, 1024)]  # ...when the run failed: it waited for them
    monkeypatch.setattr(target_chunks, "save_npy", save)
    build_targets(biomed_datastore, biomed_index, out, **kwargs)
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (biomed_targets / name).read_bytes()


def test_a_resume_against_a_rebuilt_index_is_refused_naming_it(tmp_path, biomed_datastore):
    """The chunks of a stopped run came from the index then at that path: rebuilt in between (here: another nprobe,
    applied on load), the rerun would mix two indexes' neighbours in one output. It is refused, saying so."""
    from lightning_memdec.retrieval.faiss_index import build_index

    index, out = tmp_path / "ivf", tmp_path / "t"
    build_index(biomed_datastore, index, plan=IndexSettings(factory="IVF16,Flat", nprobe=2), recall_queries=0)
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(backend="faiss", chunk_size=512))
    with pytest.raises(SimulatedKill):
        build_targets(biomed_datastore, index, out, callbacks=[Interrupt(after=1)], **kwargs)
    build_index(biomed_datastore, index, plan=IndexSettings(factory="IVF16,Flat", nprobe=4), recall_queries=0,
                overwrite=True)  # fmt: skip
    with pytest.raises(ArtifactError, match="different settings \\(index: .*; nprobe: 2 there, 4 here\\)"):
        build_targets(biomed_datastore, index, out, **kwargs)
    assert done_ranges(partial_dir(out))  # kept for a rerun against the index they came from
    assert build_targets(biomed_datastore, index, out, overwrite=True, **kwargs) == out


def test_a_resume_against_a_datastore_rebuilt_in_another_precision_is_refused(tmp_path, biomed_corpus, tiny_gpt2):
    """bf16 keys are other keys: the chunks searched in the fp32 store must not be merged with the bf16 store's."""
    store, out = tmp_path / "ds", tmp_path / "t"
    windows = dict(windows=Windows(window=64, stride=32, batch_size=4), hardware=Hardware(accelerator="cpu"))
    build_datastore(biomed_corpus, str(tiny_gpt2), store, **windows)
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(backend="exact", chunk_size=512))
    with pytest.raises(SimulatedKill):
        build_targets(store, None, out, callbacks=[Interrupt(after=1)], **kwargs)
    build_datastore(biomed_corpus, str(tiny_gpt2), store, precision="bf16", overwrite=True, **windows)
    with pytest.raises(ArtifactError, match='different settings .*"precision": "32"'):
        build_targets(store, None, out, **kwargs)


def test_exact_search_records_no_nprobe_whatever_was_passed(tmp_path, biomed_datastore):
    """nprobe means nothing to exact search: an ignored --knn.nprobe is not recorded (nor compared at a resume)."""
    kwargs = dict(knn=KNNTargets(k=16, nprobe=8), search=TargetSearch(backend="exact"))
    assert Targets(build_targets(biomed_datastore, None, tmp_path / "t", **kwargs)).meta["nprobe"] is None


def test_predictions_hold_host_values_only(tmp_path, biomed_datastore, biomed_index):
    seen = HostOutputsOnly()
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512))
    build_targets(biomed_datastore, biomed_index, tmp_path / "t", callbacks=[seen], **kwargs)
    assert seen.types == {int, np.ndarray}


def test_a_failed_chunk_save_on_the_writer_thread_fails_the_run(tmp_path, biomed_datastore, biomed_index, monkeypatch):
    """The chunks are saved on a helper thread: its error must reach the run, not vanish with the thread."""

    import lightning_memdec.stages.target_chunks as target_chunks

    n = len(Datastore(biomed_datastore))
    last = (n - 1) // 512  # the last chunk's save fails: only the end's wait sees it
    save = target_chunks.save_npy

    def disk_full_at_the_end(path, array):
        if Path(path).name.startswith(f"{range_name(last * 512, n)}."):
            raise OSError("No space left on device")
        save(path, array)

    monkeypatch.setattr(target_chunks, "save_npy", disk_full_at_the_end)
    out = tmp_path / "t"
    kwargs = dict(knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(chunk_size=512))
    with pytest.raises(OSError, match="No space left"):
        build_targets(biomed_datastore, biomed_index, out, **kwargs)
    assert last >= 2 and done_ranges(partial_dir(out)) == [(c * 512, c * 512 + 512) for c in range(last)]
    assert not out.exists()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", ["512", "100000"])  # 100000: one chunk, so the second rank has no work
def test_ddp_two_processes_give_the_same_files(tmp_path, biomed_datastore, biomed_index, biomed_targets, chunk_size):
    out = tmp_path / "t"
    cmd = [
        sys.executable,
        "-m",
        "lightning_memdec",
        "build-targets",
        "--datastore",
        str(biomed_datastore),
        "--index",
        str(biomed_index),
        "--out",
        str(out),
        "--knn.k",
        "16",
        "--knn.temperature",
        "4.0",
        "--search.chunk_size",
        chunk_size,
        "--hardware.accelerator",
        "cpu",
        "--hardware.devices",
        "2",
        "--hardware.strategy",
        "ddp",
    ]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    for name in ("offsets.npy", "ids.npy", "probs.npy"):
        assert (out / name).read_bytes() == (biomed_targets / name).read_bytes()


def test_bad_arguments_and_mismatched_stores(tmp_path, biomed_datastore, biomed_index, biomed_corpus):
    for kwargs, msg in [
        ({"k": 0}, "--knn.k must be positive"),
        ({"temperature": 0.0}, "--knn.temperature must be positive"),
        ({"temperature": -1.0}, "--knn.temperature must be positive"),
        ({"temperature": float("nan")}, "--knn.temperature must be positive"),
        ({"max_support": 0}, "--knn.max_support must be positive"),
        ({"min_prob": 1.0}, r"--knn.min_prob must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build_targets(biomed_datastore, biomed_index, tmp_path / "t", knn=KNNTargets(**kwargs))
    wide = save_tiny(tmp_path / "wide", n_embd=64)
    wide_store = build_datastore(
        biomed_corpus,
        str(wide),
        tmp_path / "wds",
        windows=Windows(window=64, stride=64),
        hardware=Hardware(accelerator="cpu"),
    )
    with pytest.raises(ArtifactError, match="dim=64 .*dim=32"):
        build_targets(biomed_datastore, biomed_index, tmp_path / "t", queries=wide_store)
    with pytest.raises(ArtifactError, match="index .* was built over datastore"):
        build_targets(wide_store, biomed_index, tmp_path / "t")
    text = tmp_path / "a.txt"
    text.write_text(" ".join(["Proteins fold into shapes that decide their function."] * 30))
    neox_corpus = tokenize([str(text)], tmp_path / "nc", "gpt-neox-20b")
    neox_model = save_tiny(tmp_path / "neox", arch="gpt_neox", tokenizer="gpt-neox-20b", vocab=50277)
    neox_store = build_datastore(
        neox_corpus,
        str(neox_model),
        tmp_path / "nds",
        windows=Windows(window=64, stride=64),
        hardware=Hardware(accelerator="cpu"),
    )
    with pytest.raises(ArtifactError, match="tokenizer gpt-neox-20b .* but datastore .* uses gpt2"):
        build_targets(biomed_datastore, biomed_index, tmp_path / "t", queries=neox_store)
    assert not (tmp_path / "t").exists() and not partial_dir(tmp_path / "t").exists()


def test_each_rank_puts_its_faiss_index_on_its_own_gpu():
    from types import SimpleNamespace

    from lightning_memdec.stages.target_searcher import index_gpu_for_rank

    def trainer(device: str, local_rank: int, world_size: int):
        strategy = SimpleNamespace(root_device=torch.device(device))
        return SimpleNamespace(strategy=strategy, local_rank=local_rank, world_size=world_size)

    assert index_gpu_for_rank(trainer("cuda:3", 3, 8)) == 3
    assert index_gpu_for_rank(trainer("cuda:0", 0, 8)) == 0
    assert index_gpu_for_rank(trainer("cpu", 1, 2)) == 1  # CPU ranks sharing a GPU machine: one GPU each
    assert index_gpu_for_rank(trainer("cpu", 0, 1)) is None  # a single process may shard over all GPUs


def test_stored_rows_hold_no_zero_probabilities(tmp_path, biomed_datastore, biomed_index):
    """A sharp temperature puts tail weights below fp16's smallest value: they are dropped, rows renormalised."""
    t = Targets(build_targets(biomed_datastore, biomed_index, tmp_path / "t", knn=KNNTargets(k=16, temperature=0.05)))
    probs = np.asarray(t.probs, dtype=np.float32)
    assert (probs > 0).all()
    sums = np.add.reduceat(probs, np.asarray(t.offsets[:-1]))
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)
    assert t.meta["nnz"] < 16 * len(t)  # some tails were dropped


def test_faiss_gpu_k_limit_refused_before_any_work(tmp_path, biomed_datastore, biomed_index):
    with pytest.raises(ValueError, match="exceeds faiss-gpu's limit of 2048"):
        build_targets(
            biomed_datastore,
            biomed_index,
            tmp_path / "t",
            knn=KNNTargets(k=2048),
            search=TargetSearch(backend="faiss", use_gpu=True),
        )
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_argument_groups_are_nested_flags_with_their_help(tmp_path, biomed_datastore, capsys):
    """`memdec build-targets --help` lists each group's fields as `--group.field` with the field's docstring; a bad
    value is refused by the group's check, naming the flag, before any work."""
    from lightning_memdec.cli import main

    helped = subprocess.run(
        [sys.executable, "-m", "lightning_memdec", "build-targets", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    for flag, text in [
        ("--knn.k", "neighbours per query"),
        ("--knn.max_support", "keep at most this many tokens"),
        ("--search.backend", "blocked matrix products"),
        ("--hardware.devices", "devices (ranks) per node"),
    ]:
        assert flag in helped.stdout and text in " ".join(helped.stdout.split()), flag
    with pytest.raises(SystemExit) as exit_:
        main(["build-targets", "--datastore", str(biomed_datastore), "--out", str(tmp_path / "t"), "--knn.k", "0"])
    assert exit_.value.code == 1 and "--knn.k must be positive" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_query_datastores_are_matched_by_the_models_weights_not_their_paths(
    tmp_path, biomed_corpus, biomed_datastore, tiny_gpt2, monkeypatch
):
    """Queries keyed by the store's model given by another path (relative here) are accepted, and the same text's
    keys are the store's own: each position's own entry excluded, as without --queries (by path, a copy's would be
    its nearest neighbour at distance 0, a leaked label); by other weights under the same layer and width, refused."""
    monkeypatch.chdir(tiny_gpt2.parent)
    windows, cpu = Windows(window=64, stride=32, batch_size=4), Hardware(accelerator="cpu")
    same = build_datastore(biomed_corpus, tiny_gpt2.name, tmp_path / "same", windows=windows, hardware=cpu)
    assert Datastore(same).meta["model"] != Datastore(biomed_datastore).meta["model"]  # the path as given
    knn = KNNTargets(k=4, temperature=4.0)
    by_copy = Targets(build_targets(biomed_datastore, out=tmp_path / "t-same", queries=same, knn=knn))
    own = Targets(build_targets(biomed_datastore, out=tmp_path / "t-own", knn=knn))
    assert by_copy.meta["self_excluded"] and len(by_copy) == len(own)
    assert all(np.array_equal(a, b) for i in range(len(own)) for a, b in zip(by_copy.row(i), own.row(i)))
    other_model = save_tiny(tmp_path / "other", seed=1)
    other = build_datastore(biomed_corpus, str(other_model), tmp_path / "other-ds", windows=windows, hardware=cpu)
    with pytest.raises(ArtifactError, match="has model_sha256=.*build both with the same base LM"):
        build_targets(biomed_datastore, out=tmp_path / "t-other", queries=other, knn=knn)


def test_a_datastore_s_identity_is_its_entries_and_the_model_is_its_weights():
    """Queries are self-excluded, and an index accepted, only for the same entries: another layer, stride, window,
    text, size or weights is another store (queries of another layer are refused outright); the model's path is not
    part of it where both sides record the weights' hash."""
    from lightning_memdec.io.readers import check_compatible, check_index_matches

    tokenizer = {"name": "gpt2", "fingerprint": "f" * 64, "vocab_size": 50257}

    def store(name: str, **changed) -> Datastore:
        """A datastore of this meta.json (these checks read no keys)."""
        made = Datastore.__new__(Datastore)
        made.dir = Path(name)
        made.meta = {"corpus_sha256": "c0ffee", "model": "/models/gpt2", "model_sha256": "ab12", "dim": 768,
                     "layer": "transformer.h.-1.ln_2", "window": 1024, "stride": 512, "num_entries": 1000,
                     "tokenizer": tokenizer} | changed  # fmt: skip
        return made

    a = store("a")
    index_meta = {"datastore": "a", "datastore_identity": a.identity()}
    same = store("copy", model="../models/gpt2")  # the same weights by another path
    assert a.same_entries(same) and same.same_entries(a)
    check_index_matches("index-of-a", index_meta, same)
    for field, value in (("layer", "transformer.h.-1.ln_1"), ("stride", 256), ("window", 512),
                         ("corpus_sha256", "0ther"), ("num_entries", 999), ("model_sha256", "cd34")):  # fmt: skip
        other = store(f"other-{field}", **{field: value})
        assert not a.same_entries(other) and not other.same_entries(a), field
        with pytest.raises(ArtifactError, match="was built over datastore a, not over"):
            check_index_matches("index-of-a", index_meta, other)
    with pytest.raises(ArtifactError, match="has layer='transformer.h.-1.ln_1' but datastore a has layer="):
        check_compatible(store("q", layer="transformer.h.-1.ln_1"), a)
