"""`memdec import-official` on files written here in exactly the official repository's schemas (LUMIA-Group/
MemoryDecoder: knn_utils/saveEmbedMulti.py, saveKNNMulti.py, build_index.py), well-formed and malformed."""

from __future__ import annotations

import json
import sys

import faiss
import numpy as np
import pyarrow as pa
import pytest

from lightning_memdec.cli import main
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.readers import Datastore, Targets
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.retrieval.faiss_index import KeyIndex
from lightning_memdec.stages.official_import import import_official
from lightning_memdec.stages.settings import KNNTargets, TargetSearch
from lightning_memdec.stages.targets import build_targets
from lightning_memdec.training.datamodule import WindowTargetsDataset

BATCH = 700  # rows per record batch: the files have several, the last one short


def write_stream(path, schema, columns: dict, batch=BATCH, writer=None):
    """An Arrow IPC stream as the official scripts write it: pa.ipc.new_stream, one record batch per step (``writer``
    pa.ipc.new_file: an IPC file, which the import reads too)."""
    n = len(next(iter(columns.values())))
    with pa.OSFile(str(path), "wb") as sink, (writer or pa.ipc.new_stream)(sink, schema) as writer:
        for lo in range(0, n, batch):
            arrays = [pa.array(list(columns[f.name][lo : lo + batch]), type=f.type) for f in schema]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return path


def datastore_schema(dim, key_type=None, val_type=None):
    key_type, val_type = key_type or pa.float16(), val_type or pa.int32()
    return pa.schema([pa.field("keys", pa.list_(key_type, dim)), pa.field("vals", val_type)])


TARGETS_SCHEMA = pa.schema(
    [
        pa.field("id_cnt", pa.int32()),
        pa.field("token_id", pa.list_(pa.int32())),
        pa.field("prob", pa.list_(pa.float16())),
        pa.field("label", pa.int32()),
    ]
)


def official_datastore(path, store: Datastore, keys=None, vals=None, schema=None):
    keys = np.asarray(store.keys) if keys is None else keys
    vals = np.asarray(store.values) if vals is None else vals
    return write_stream(path, schema or datastore_schema(store.dim), {"keys": list(keys), "vals": vals})


def official_targets(path, targets: Targets, labels, id_cnt=None, token_id=None):
    rows = [targets.row(i) for i in range(len(targets))]
    columns = {
        "id_cnt": [len(ids) for ids, _ in rows] if id_cnt is None else id_cnt,
        "token_id": [ids for ids, _ in rows] if token_id is None else token_id,
        "prob": [probs for _, probs in rows],
        "label": labels,
    }
    return write_stream(path, TARGETS_SCHEMA, columns)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, biomed_datastore, biomed_corpus):
    root = tmp_path_factory.mktemp("official")
    arrow = official_datastore(root / "dstore_gpt2_train_32.arrow", Datastore(biomed_datastore))
    main(["import-official", "--datastore", str(arrow), "--corpus", str(biomed_corpus), "--out", str(root / "ds")])
    return root


def assert_nothing_written(out):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_datastore_import_is_the_same_entries(imported, biomed_datastore, biomed_corpus):
    source, store = Datastore(biomed_datastore), Datastore(imported / "ds")
    np.testing.assert_array_equal(store.keys, source.keys)
    np.testing.assert_array_equal(store.values, Corpus(biomed_corpus).next_tokens())
    assert store.meta["corpus_sha256"] == Corpus(biomed_corpus).meta["content_sha256"]
    assert store.tokenizer == source.tokenizer and store.meta["layer"] == "official:last_ffn_input"


def test_datastore_import_from_a_directory_of_shards(tmp_path, biomed_datastore, biomed_corpus):
    source = Datastore(biomed_datastore)
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(source) // 2
    official_datastore(shards / "data-00000-of-00002.arrow", source, source.keys[:half], source.values[:half])
    official_datastore(shards / "data-00001-of-00002.arrow", source, source.keys[half:], source.values[half:])
    import_official(tmp_path / "ds", datastore=shards, corpus=biomed_corpus)
    np.testing.assert_array_equal(Datastore(tmp_path / "ds").keys, source.keys)


def test_datastore_import_from_an_arrow_ipc_file(tmp_path, biomed_datastore, biomed_corpus):
    """An IPC *file* (pa.ipc.new_file) passed the reader's fallback, then failed: its reader is not iterable."""
    source = Datastore(biomed_datastore)
    columns = {"keys": list(np.asarray(source.keys)), "vals": np.asarray(source.values)}
    arrow = write_stream(tmp_path / "dstore.arrow", datastore_schema(source.dim), columns, writer=pa.ipc.new_file)
    import_official(tmp_path / "ds", datastore=arrow, corpus=biomed_corpus)
    np.testing.assert_array_equal(Datastore(tmp_path / "ds").keys, source.keys)
    np.testing.assert_array_equal(Datastore(tmp_path / "ds").values, source.values)


def test_datastore_import_with_the_base_records_its_key_layer(tmp_path, biomed_datastore, biomed_corpus, tiny_gpt2):
    """The official key (the last MLP's input) is this package's default layer: kNN-LM can hook the base there."""
    arrow = official_datastore(tmp_path / "dstore.arrow", Datastore(biomed_datastore))
    store = Datastore(import_official(tmp_path / "ds", datastore=arrow, corpus=biomed_corpus, model=str(tiny_gpt2)))
    assert store.meta["layer"] == Datastore(biomed_datastore).meta["layer"] == "transformer.h.-1.ln_2"
    assert store.meta["model_type"] == "gpt2" and store.meta["model"] == str(tiny_gpt2)


def test_imported_datastore_gives_the_same_targets(imported, tmp_path, biomed_datastore):
    """build-targets accepts the import, and its targets are the source datastore's, number for number."""
    ours = build_targets(
        biomed_datastore,
        None,
        tmp_path / "t-src",
        knn=KNNTargets(k=16, temperature=4.0),
        search=TargetSearch(backend="exact"),
    )
    theirs = build_targets(
        imported / "ds",
        None,
        tmp_path / "t-imp",
        knn=KNNTargets(k=16, temperature=4.0),
        search=TargetSearch(backend="exact"),
    )
    for name in ("offsets", "ids", "probs"):
        np.testing.assert_array_equal(getattr(Targets(ours), name), getattr(Targets(theirs), name))


@pytest.mark.parametrize(
    "case, match",
    [
        ("keys float32", "column 'keys' is fixed_size_list<item: float>"),
        ("vals int64", "column 'vals' is int64"),
        ("vals off by one", "entry 5 has value .* but corpus .* has token"),
        ("entries missing", "has 2998 entries but corpus .* has 2999 positions"),
        ("not arrow", "is not an Arrow IPC stream or file"),
        ("no keys", "has no column 'keys'"),
    ],
)
def test_malformed_datastore_is_refused_and_nothing_written(tmp_path, biomed_datastore, biomed_corpus, case, match):
    store = Datastore(biomed_datastore)
    keys, vals, path = np.asarray(store.keys), np.asarray(store.values).copy(), tmp_path / "dstore.arrow"
    if case == "keys float32":
        official_datastore(path, store, schema=datastore_schema(store.dim, key_type=pa.float32()))
    elif case == "vals int64":
        official_datastore(path, store, schema=datastore_schema(store.dim, val_type=pa.int64()))
    elif case == "vals off by one":
        vals[5] += 1
        official_datastore(path, store, vals=vals)
    elif case == "entries missing":
        official_datastore(path, store, keys[:-1], vals[:-1])
    elif case == "not arrow":
        path.write_bytes(b"not an arrow file at all")
    else:
        write_stream(path, pa.schema([pa.field("vals", pa.int32())]), {"vals": vals})
    with pytest.raises(ArtifactError, match=match):
        import_official(tmp_path / "ds", datastore=path, corpus=biomed_corpus)
    assert_nothing_written(tmp_path / "ds")


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch, biomed_corpus):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    (tmp_path / "dstore.arrow").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install 'lightning_memdec\[official\]'"):
        import_official(tmp_path / "ds", datastore=tmp_path / "dstore.arrow", corpus=biomed_corpus)
    assert_nothing_written(tmp_path / "ds")


def test_datastore_without_corpus_needs_a_tokenizer_and_checks_its_range(tmp_path, biomed_datastore):
    store = Datastore(biomed_datastore)
    path = official_datastore(tmp_path / "dstore.arrow", store)
    with pytest.raises(ValueError, match="exactly one of --corpus .* or --tokenizer"):
        import_official(tmp_path / "ds", datastore=path)
    vals = np.asarray(store.values).copy()
    vals[7] = 50257
    bad = official_datastore(tmp_path / "bad.arrow", store, vals=vals)
    with pytest.raises(ArtifactError, match="entry 7 has value 50257, outside the tokenizer's 50257 ids"):
        import_official(tmp_path / "ds", datastore=bad, tokenizer="gpt2")
    assert_nothing_written(tmp_path / "ds")
    out = import_official(tmp_path / "ds", datastore=path, tokenizer="gpt2")
    assert Datastore(out).meta["corpus_sha256"].startswith("vals-") and Datastore(out).meta["corpus"] is None


def test_nan_key_discards_the_half_written_import(tmp_path, biomed_datastore, biomed_corpus):
    store = Datastore(biomed_datastore)
    keys = np.asarray(store.keys).copy()
    keys[len(keys) - 3, 0] = np.nan  # in the last record batch: found while writing, after the checks passed
    path = official_datastore(tmp_path / "dstore.arrow", store, keys=keys)
    with pytest.raises(ArtifactError, match=f"keys are NaN or inf, the first at position {len(keys) - 3}"):
        import_official(tmp_path / "ds", datastore=path, corpus=biomed_corpus)
    assert_nothing_written(tmp_path / "ds")


@pytest.fixture(scope="module")
def source_targets(tmp_path_factory, biomed_datastore):
    out = tmp_path_factory.mktemp("src-targets") / "t"
    return Targets(
        build_targets(
            biomed_datastore, None, out, knn=KNNTargets(k=16, temperature=4.0), search=TargetSearch(backend="exact")
        )
    )


def test_targets_import_is_the_same_csr_and_fit_accepts_it(imported, tmp_path, source_targets, biomed_corpus):
    store = Datastore(imported / "ds")
    arrow = official_targets(tmp_path / "knn_gpt2_train_32.arrow", source_targets, np.asarray(store.values))
    out = import_official(tmp_path / "t", datastore=imported / "ds", targets=arrow)
    targets = Targets(out)
    for name in ("offsets", "ids", "probs"):
        np.testing.assert_array_equal(getattr(targets, name), getattr(source_targets, name))
    dataset = WindowTargetsDataset(str(biomed_corpus), str(out), window=64, stride=64)  # what fit reads
    assert len(dataset) > 0 and targets.meta["search"] == "official"
    assert targets.meta["self_excluded"] is None  # the file does not say; saveKNNMulti.py keeps it by default


@pytest.mark.slow
def test_targets_import_then_fit_runs(imported, tmp_path, source_targets, biomed_corpus):
    from lightning_memdec.training.fit import lightning_cli

    arrow = official_targets(tmp_path / "knn.arrow", source_targets, np.asarray(Datastore(imported / "ds").values))
    targets = import_official(tmp_path / "t", datastore=imported / "ds", targets=arrow)
    model = '{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}'
    data = {
        "train_corpus": biomed_corpus,
        "train_targets": targets,
        "val_corpus": biomed_corpus,
        "val_targets": targets,
    }
    args = [x for key, value in data.items() for x in (f"--data.{key}", str(value))]
    cli = lightning_cli(
        ["fit", "--model.config", model, *args, "--data.window", "64", "--data.batch_size", "2"]
        + ["--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
        + ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]
        + ["--export.dirpath", str(tmp_path / "run" / "hf")]
    )
    assert cli.trainer.global_step == 2 and np.isfinite(float(cli.trainer.callback_metrics["train/kl"]))


@pytest.mark.parametrize(
    "case, match",
    [
        ("ragged token_id", "row 3 has id_cnt .* but .* token_id entries \\(ragged rows\\)"),
        ("ragged prob", "row 3 has id_cnt .* but .* prob entries \\(ragged rows\\)"),
        ("wrong label", "row 9 has label .* but datastore .* has value"),
        ("rows missing", "have 2998 rows but datastore .* has 2999 entries"),
        ("id out of range", "token ids outside the tokenizer's 50257 ids"),
        ("negative prob", "probabilities negative/NaN"),
        ("unsorted row", "row 8's probabilities are not sorted from the most likely down"),
        ("null inside token_id", "rows 0–700: null entries"),  # no row is null, one element is: a pyarrow traceback
        ("null inside prob", "rows 700–1400: null entries"),
    ],
)
def test_malformed_targets_are_refused_and_nothing_written(imported, tmp_path, source_targets, case, match):
    labels = np.asarray(Datastore(imported / "ds").values).copy()
    rows = [source_targets.row(i) for i in range(len(source_targets))]
    counts, ids = [len(i) for i, _ in rows], [i.copy() for i, _ in rows]
    path = tmp_path / "knn.arrow"
    if case == "ragged token_id":
        ids[3] = ids[3][:-1]
        write_stream(
            path, TARGETS_SCHEMA, {"id_cnt": counts, "token_id": ids, "prob": [p for _, p in rows], "label": labels}
        )
    elif case == "ragged prob":
        counts[3] -= 1
        ids[3] = ids[3][:-1]
        write_stream(
            path, TARGETS_SCHEMA, {"id_cnt": counts, "token_id": ids, "prob": [p for _, p in rows], "label": labels}
        )
    elif case == "wrong label":
        labels[9] += 1
        official_targets(path, source_targets, labels)
    elif case.startswith("null inside"):
        ids, probs = [list(i) for i in ids], [list(p) for _, p in rows]
        (ids if case.endswith("token_id") else probs)[5 if case.endswith("token_id") else 705][0] = None
        columns = {"id_cnt": counts, "token_id": ids, "prob": probs, "label": labels}
        write_stream(path, TARGETS_SCHEMA, columns)
    elif case == "rows missing":
        columns = {"id_cnt": counts, "token_id": ids, "prob": [p for _, p in rows], "label": labels}
        write_stream(path, TARGETS_SCHEMA, {k: v[:-1] for k, v in columns.items()})
    elif case in ("negative prob", "unsorted row"):
        probs = [p.copy() for _, p in rows]
        if case == "negative prob":
            probs[6][0] = -0.2
        else:
            probs[8] = probs[8][::-1].copy()  # the least likely first
        write_stream(path, TARGETS_SCHEMA, {"id_cnt": counts, "token_id": ids, "prob": probs, "label": labels})
    else:
        ids[4][0] = 60000
        official_targets(path, source_targets, labels, token_id=ids)
    with pytest.raises(ArtifactError, match=match):
        import_official(tmp_path / "t", datastore=imported / "ds", targets=path)
    assert_nothing_written(tmp_path / "t")


def test_targets_of_the_wrong_type_are_refused(imported, tmp_path, source_targets):
    schema = pa.schema([f if f.name != "prob" else pa.field("prob", pa.list_(pa.float32())) for f in TARGETS_SCHEMA])
    rows = [source_targets.row(i) for i in range(len(source_targets))]
    columns = {"id_cnt": [len(i) for i, _ in rows], "token_id": [i for i, _ in rows], "prob": [p for _, p in rows]}
    path = write_stream(tmp_path / "knn.arrow", schema, {**columns, "label": Datastore(imported / "ds").values})
    with pytest.raises(ArtifactError, match="column 'prob' is list<item: float>, but the official schema has"):
        import_official(tmp_path / "t", datastore=imported / "ds", targets=path)
    assert_nothing_written(tmp_path / "t")


def official_ivfpq(keys: np.ndarray, ids: np.ndarray, nlist=8, m=4) -> faiss.Index:
    """knn_utils/build_index.py: IndexIVFPQ(IndexFlatL2(d), d, ncentroids, code_size, 8), add_with_ids."""
    quantizer = faiss.IndexFlatL2(keys.shape[1])
    index = faiss.IndexIVFPQ(quantizer, keys.shape[1], nlist, m, 8)
    index.nprobe = 4
    index.train(keys.astype(np.float32))
    index.add_with_ids(keys.astype(np.float32), ids)
    return index


def test_index_import_searches_like_the_official_index(imported, tmp_path):
    store = Datastore(imported / "ds")
    keys = np.asarray(store.keys, dtype=np.float32)
    index = official_ivfpq(keys, np.arange(len(keys)))
    faiss.write_index(index, str(tmp_path / "train_32.index"))
    out = import_official(tmp_path / "idx", datastore=imported / "ds", index=tmp_path / "train_32.index")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["factory"] == "IVF8,PQ4" and meta["nprobe"] == 4 and meta["ntotal"] == len(store)
    loaded = KeyIndex(out)
    loaded.check_datastore(store)
    np.testing.assert_array_equal(loaded.search(keys[:50], 8)[1], index.search(keys[:50], 8)[1])
    targets = build_targets(
        imported / "ds", out, tmp_path / "t", knn=KNNTargets(k=8, temperature=4.0), search=TargetSearch(backend="faiss")
    )
    assert Targets(targets).meta["index_factory"] == "IVF8,PQ4"


@pytest.mark.parametrize(
    "case, match",
    [
        ("dimension", "holds 2999 keys of 16 dims, but datastore .* has 2999 keys of 32"),
        ("size", "holds 2998 keys of 32 dims, but datastore .* has 2999 keys of 32"),
        ("ids shifted", "stores ids outside 0..2998 or an id twice"),
        ("id twice", "stores ids outside 0..2998 or an id twice"),
    ],
)
def test_malformed_index_is_refused_and_nothing_written(imported, tmp_path, case, match):
    keys = np.asarray(Datastore(imported / "ds").keys, dtype=np.float32)
    ids = np.arange(len(keys))
    if case == "dimension":
        index = official_ivfpq(keys[:, :16], ids)
    elif case == "size":
        index = official_ivfpq(keys[:-1], ids[:-1])
    elif case == "ids shifted":
        index = official_ivfpq(keys, ids + 1)
    else:
        ids[10] = 11
        index = official_ivfpq(keys, ids)
    faiss.write_index(index, str(tmp_path / "bad.index"))
    with pytest.raises(ArtifactError, match=match):
        import_official(tmp_path / "idx", datastore=imported / "ds", index=tmp_path / "bad.index")
    assert_nothing_written(tmp_path / "idx")


def test_an_import_needs_one_thing_to_import(tmp_path):
    with pytest.raises(ValueError, match="give --datastore"):
        import_official(tmp_path / "o", targets=tmp_path / "knn.arrow")
    with pytest.raises(ValueError, match="give --targets or --index, not both"):
        import_official(tmp_path / "o", datastore=tmp_path, targets=tmp_path / "k.arrow", index=tmp_path / "i.index")
    keys = np.zeros((3, 4), dtype=np.float16)
    arrow = write_stream(tmp_path / "dstore.arrow", datastore_schema(4), {"keys": list(keys), "vals": [1, 2, 3]})
    (tmp_path / "not-a-model").mkdir()  # a directory without config.json: refused offline, before the scan
    with pytest.raises(ValueError, match="cannot load model '.*not-a-model'"):
        import_official(tmp_path / "o", datastore=arrow, tokenizer="gpt2", model=str(tmp_path / "not-a-model"))
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("case", ["datastore", "model", "model added", "targets", "index"])
def test_a_rerun_with_another_input_at_the_same_path_after_a_stop_inside_publish_is_refused(
    imported, tmp_path, monkeypatch, source_targets, biomed_datastore, biomed_corpus, tiny_gpt2, case
):
    """The run settings named the official files (and the base) by their paths, and left out --model: a file
    replaced at the same path (or --model added) after a stop inside publish was called done with the old file's
    output. The files' size, mtime and inode, and the base's name and type, tell them apart; the same command is
    still done."""
    from conftest import save_tiny, stopped_inside_publish

    from lightning_memdec.io.artifact_dirs import partial_dir, read_meta

    source, store = Datastore(biomed_datastore), Datastore(imported / "ds")
    keys, labels = np.asarray(store.keys, dtype=np.float32), np.asarray(store.values)
    arrow, base = tmp_path / "dstore.arrow", save_tiny(tmp_path / "base")
    official_datastore(arrow, source)
    knn = official_targets(tmp_path / "knn.arrow", source_targets, labels)
    index = tmp_path / "train.index"
    faiss.write_index(official_ivfpq(keys, np.arange(len(keys))), str(index))
    model = {"model": str(base)} if case == "model" else {}
    imports = {
        "datastore": dict(datastore=arrow, corpus=biomed_corpus, **model),
        "targets": dict(datastore=imported / "ds", targets=knn),
        "index": dict(datastore=imported / "ds", index=index),
    }
    kwargs = imports[case if case in imports else "datastore"]
    for out in (tmp_path / "same", tmp_path / "changed"):
        stopped_inside_publish(monkeypatch, import_official, out, **kwargs)
        assert not out.exists() and (partial_dir(out) / "meta.json").is_file()
    assert import_official(tmp_path / "same", **kwargs) == tmp_path / "same"  # done: in place
    assert not partial_dir(tmp_path / "same").exists()
    if case == "datastore":  # the official datastore rebuilt: other keys, the same values
        official_datastore(arrow, source, keys=np.asarray(source.keys) / 2)
    elif case == "model":  # another base saved at the same path: another key layer
        save_tiny(base, arch="gpt_neox")
    elif case == "model added":
        kwargs = kwargs | {"model": str(base)}
    elif case == "targets":  # the official targets rebuilt: other probabilities
        rows = [source_targets.row(i) for i in range(len(source_targets))]
        columns = {"id_cnt": [len(ids) for ids, _ in rows], "token_id": [ids for ids, _ in rows],
                   "prob": [probs / 2 for _, probs in rows], "label": labels}  # fmt: skip
        write_stream(knn, TARGETS_SCHEMA, columns)
    else:  # the official index rebuilt as a flat one
        index_ids = faiss.IndexIDMap(faiss.IndexFlatL2(keys.shape[1]))
        index_ids.add_with_ids(keys, np.arange(len(keys)))
        faiss.write_index(index_ids, str(index))
    before = read_meta(partial_dir(tmp_path / "changed"))
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        import_official(tmp_path / "changed", **kwargs)
    assert read_meta(tmp_path / "changed") == before  # the stopped run's output, left for --overwrite
