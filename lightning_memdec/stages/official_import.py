"""`memdec import-official`: the paper's code's artefacts (LUMIA-Group/MemoryDecoder) as this package's artefacts.

Three imports, each checked in full before anything is written, streamed (record batches of memory-mapped Arrow
files; the index is copied, not re-serialised) and published atomically under the output lock like every stage:

- an Arrow datastore (``keys: fixed_size_list<float16>[d]``, ``vals: int32``; entry ``i`` is position ``i``, as
  here) → ``keys.npy``/``values.npy``; with ``--corpus`` the values must be the corpus's next tokens;
- Arrow kNN targets (``id_cnt``, ``token_id``, ``prob``, ``label``) over an imported datastore → CSR targets,
  offsets from ``id_cnt``, every ``label`` checked against the datastore's value;
- a FAISS index built with ``add_with_ids`` over an imported datastore → an index directory, after its size,
  dimension, metric and ids (each of 0..N-1 exactly once) are checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

import numpy as np

from lightning_memdec.hf.key_capture import default_key_layer_of_config
from lightning_memdec.hf.loading import model_config
from lightning_memdec.io.artifact_dirs import ArtifactError, base_meta, publish, start_work_dir
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.npy_rows import NpyAppender, read_rows
from lightning_memdec.io.official_arrow import (
    arrow_files,
    check_schemas,
    datastore_schema,
    key_dim,
    record_batches,
    targets_schema,
)
from lightning_memdec.io.output_lock import exclusive_output
from lightning_memdec.io.readers import IDS, INDEX, KEYS, OFFSETS, PROBS, VALUES, Datastore, check_finite_keys
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.io.tokenizer_identity import tokenizer_info
from lightning_memdec.stages.targets import targets_meta

OFFICIAL_LAYER = "official:last_ffn_input"  # the official key: the input of the last block's MLP
OFFICIAL_WINDOW, OFFICIAL_STRIDE = 1024, 512  # utils/preprocess_dataset.py's block_size and stride


@exclusive_output
def import_official(
    out: Path,
    datastore: Path | None = None,
    targets: Path | None = None,
    index: Path | None = None,
    corpus: Path | None = None,
    tokenizer: str | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Import the official repository's datastore, kNN targets or FAISS index (see docs/official.md).

    Args:
        out: the output directory (a datastore, targets or index directory).
        datastore: with neither ``targets`` nor ``index``: the official datastore's .arrow file (or a directory of
            them) to import; with one of them: the datastore directory this command imported.
        targets: the official kNN targets .arrow file (knn_utils/saveKNNMulti.py) to import.
        index: the official FAISS index file (knn_utils/build_index.py) to import.
        corpus: datastore import: the corpus (``memdec tokenize --separation official``) whose next tokens the
            datastore's ``vals`` must be; fit needs it. Without it the datastore records ``tokenizer``.
        tokenizer: datastore import without ``corpus``: the tokenizer of the ``vals`` (name or path).
        model: datastore import: the base LM the keys came from (recorded, for kNN-LM evaluation).
        overwrite: replace an existing output.
    """
    if datastore is None:
        raise ValueError("give --datastore: the official .arrow datastore, or the directory it was imported into.")
    if targets is not None and index is not None:
        raise ValueError("give --targets or --index, not both: each is imported into its own --out directory.")
    if targets is not None:
        return import_targets(Path(targets), Path(datastore), Path(out), overwrite)
    if index is not None:
        return import_index(Path(index), Path(datastore), Path(out), overwrite)
    if (corpus is None) == (tokenizer is None):
        raise ValueError(
            "a datastore import needs exactly one of --corpus (the tokenized corpus the vals continue, needed for "
            "fit) or --tokenizer (the vals' tokenizer, when no corpus is at hand)."
        )
    return import_datastore(Path(datastore), Path(out), corpus, tokenizer, model, overwrite)


def import_datastore(
    arrow: Path, out: Path, corpus: Path | None, tokenizer: str | None, model: str | None, overwrite: bool
) -> Path:
    """Keys and values of an official Arrow datastore into ``keys.npy``/``values.npy`` and a datastore meta.json."""
    files = arrow_files(arrow, "--datastore")
    dim = key_dim(files)
    schema = datastore_schema(dim)
    check_schemas(files, schema)
    data = Corpus(corpus) if corpus is not None else None
    info = data.tokenizer if data is not None else tokenizer_info(load_tokenizer(tokenizer), tokenizer)
    config = model_config(model) if model is not None else None  # a wrong --model fails before the scan
    model_type = config.model_type if config is not None else None
    num_entries, values_sha256 = scan_values(files, schema, data, info["vocab_size"])
    run_config = {
        "files": [file_identity(f) for f in files],
        "corpus": data.meta["content_sha256"] if data is not None else None,
        "tokenizer": info,
        "model": None if model is None else {"name": model, "model_type": model_type},  # what meta.json takes of it
    }
    work = start_work_dir(out, run_config, overwrite)
    with discarded_on_error(work):
        write_entries(files, schema, work, num_entries, dim)
    meta = base_meta(
        "datastore",
        model=model or "official",
        model_type=model_type,
        layer=official_key_layer(config),
        dim=dim,
        key_dtype="float16",
        num_entries=num_entries,
        window=OFFICIAL_WINDOW,
        stride=OFFICIAL_STRIDE,
        corpus=str(Path(corpus).resolve()) if data is not None else None,
        corpus_sha256=data.meta["content_sha256"] if data is not None else f"vals-{values_sha256}",
        tokenizer=info,
        imported_from=[{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
    )
    return publish(work, out, meta)


def official_key_layer(config) -> str:
    """The layer a kNN-LM over the imported store captures from the ``--model`` base: the input of its last block's
    MLP, as the official keys are; without ``--model`` (or a model with no such block), a name no capture resolves."""
    if config is None:
        return OFFICIAL_LAYER
    try:
        return default_key_layer_of_config(config)
    except ValueError:
        return OFFICIAL_LAYER


def file_identity(path: Path) -> dict:
    """An imported file in the run settings, so a file replaced at the same path after a stop inside publish is
    another run (refused), not this one (called done with the old file's output): its path, size, mtime and inode,
    not its sha256. The official datastore, targets and index are tens to hundreds of GB at paper scale: hashing
    them would add minutes to every import (the scans read only some columns), while a file rewritten or replaced
    gets a new mtime or inode (rewritten within one clock tick at the same size, it would not be told apart)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def scan_values(files: list[Path], schema, data: Corpus | None, vocab_size: int) -> tuple[int, str]:
    """The entry count and a hash of the values, reading only the ``vals`` column; refuses nulls, ids outside the
    vocabulary and (with a corpus) any value that is not the corpus's next token, naming the first bad entry."""
    count, digest = 0, hashlib.sha256()
    for path, batch in record_batches(files, schema):
        keys, vals = batch.column("keys"), batch.column("vals")
        if keys.null_count or keys.values.null_count or vals.null_count:
            raise ArtifactError(f"{path}: null keys or vals in entries {count}–{count + len(batch)}; re-export it.")
        values = vals.to_numpy()
        bad = (values < 0) | (values >= vocab_size)
        if bad.any():
            at = int(bad.argmax())
            raise ArtifactError(
                f"{path}: entry {count + at} has value {values[at]}, outside the tokenizer's {vocab_size} ids; "
                "give the tokenizer (or corpus) the datastore was built with."
            )
        if data is not None:
            check_next_tokens(values, count, data, path)
        digest.update(values.astype("<i4").tobytes())
        count += len(values)
    if data is not None and count != data.num_positions:
        raise ArtifactError(
            f"the datastore {files[0].parent if len(files) > 1 else files[0]} has {count} entries but corpus "
            f"{data.dir} has {data.num_positions} positions; tokenize the corpus with `memdec tokenize --separation "
            "official` and the official preprocessing's tokenizer."
        )
    return count, digest.hexdigest()[:16]


def check_next_tokens(values: np.ndarray, first: int, data: Corpus, path: Path) -> None:
    """Entry ``first + i``'s value must be the corpus's token ``first + i + 1`` (the next token of that position)."""
    expected = read_rows(data.tokens, first + 1, first + 1 + len(values)).astype(np.int64)
    if len(expected) < len(values) or (expected != values[: len(expected)]).any():
        at = len(expected) if len(expected) < len(values) else int((expected != values).argmax())
        want = f"token {expected[at]}" if at < len(expected) else "the corpus's end"
        raise ArtifactError(
            f"{path}: entry {first + at} has value {values[at]} but corpus {data.dir} has {want} there; the corpus "
            "was tokenized differently: use `memdec tokenize --separation official` with the same tokenizer."
        )


def write_entries(files: list[Path], schema, work: Path, num_entries: int, dim: int) -> None:
    """Stream keys [N, d] fp16 and values [N] int32 into ``work``, one record batch at a time."""
    with NpyAppender(work / KEYS, np.float16, (dim,), num_entries) as keys_out:
        with NpyAppender(work / VALUES, np.int32, length=num_entries) as values_out:
            for path, batch in record_batches(files, schema):
                keys = batch.column("keys").flatten().to_numpy().reshape(-1, dim)
                check_finite_keys(keys, keys_out.count, f"official datastore {path}")
                keys_out.append(keys)
                values_out.append(batch.column("vals").to_numpy())


def import_targets(arrow: Path, datastore: Path, out: Path, overwrite: bool) -> Path:
    """Official kNN targets (one row per datastore entry) into CSR targets for the imported ``datastore``."""
    store = Datastore(datastore)
    files = arrow_files(arrow, "--targets")
    schema = targets_schema()
    check_schemas(files, schema)
    num_positions, nnz = scan_targets(files, schema, store)
    run_config = {"files": [file_identity(f) for f in files], "datastore": store.identity()}
    work = start_work_dir(out, run_config, overwrite)
    with discarded_on_error(work):
        write_csr(files, schema, work, num_positions, nnz)
    settings = {"search": "official", "k": None, "temperature": None, "max_support": None, "min_prob": None}
    settings.update(exact_distances=False, nprobe=None, imported_from=[str(f.resolve()) for f in files])
    # unknown: the file does not say, and saveKNNMulti.py keeps each entry's own match unless --ignore_first
    return publish(work, out, targets_meta(store, store, None, num_positions, nnz, None, settings))


def scan_targets(files: list[Path], schema, store: Datastore) -> tuple[int, int]:
    """Row and support counts; refuses nulls, ragged rows (``id_cnt`` vs the lists' lengths), ids outside the
    vocabulary, negative or non-finite probabilities, a row not sorted by probability (``--data.max_support`` keeps
    each row's first entries as its most likely: saveKNNMulti.py sorts them), labels that are not the datastore's
    values, a wrong row count."""
    rows, nnz, vocab = 0, 0, store.tokenizer["vocab_size"]
    for path, batch in record_batches(files, schema):
        where = f"{path}, rows {rows}–{rows + len(batch)}"
        lists = [batch.column(c).flatten() for c in ("token_id", "prob")]  # a null inside a row is no row's null
        if any(batch.column(c).null_count for c in schema.names) or any(v.null_count for v in lists):
            raise ArtifactError(f"{where}: null entries; the file is incomplete, re-export it.")
        counts = batch.column("id_cnt").to_numpy().astype(np.int64)
        for column in ("token_id", "prob"):
            lengths = np.diff(batch.column(column).offsets.to_numpy())
            if (lengths != counts).any():
                at = int((lengths != counts).argmax())
                raise ArtifactError(
                    f"{path}: row {rows + at} has id_cnt {counts[at]} but {lengths[at]} {column} entries (ragged "
                    "rows); the file is corrupt, re-export it."
                )
        ids, probs = lists[0].to_numpy(), lists[1].to_numpy().astype(np.float32)
        if ((ids < 0) | (ids >= vocab)).any() or not (np.isfinite(probs) & (probs >= 0)).all():
            raise ArtifactError(
                f"{where}: token ids outside the tokenizer's {vocab} ids or probabilities negative/NaN; the targets "
                f"are not for datastore {store.dir}, or corrupt."
            )
        check_sorted_rows(probs, counts, rows, path)
        check_labels(batch.column("label").to_numpy(), rows, store, path)
        rows, nnz = rows + len(batch), nnz + int(counts.sum())
    if rows != len(store):
        raise ArtifactError(
            f"the targets {files[0]} have {rows} rows but datastore {store.dir} has {len(store)} entries; import the "
            "targets built from that datastore."
        )
    return rows, nnz


def check_sorted_rows(probs: np.ndarray, counts: np.ndarray, first: int, path: Path) -> None:
    """Each row's probabilities (``probs`` flat, ``counts`` a row) must not increase along the row."""
    row_of = np.repeat(np.arange(len(counts)), counts)  # [nnz]
    rises = (np.diff(probs) > 0) & (np.diff(row_of) == 0)  # an entry more likely than the one before it, in a row
    if rises.any():
        row = first + int(row_of[rises.argmax()])
        raise ArtifactError(
            f"{path}: row {row}'s probabilities are not sorted from the most likely down (saveKNNMulti.py sorts "
            "each row; --data.max_support keeps a row's first entries); sort each row by probability, re-export it."
        )


def check_labels(labels: np.ndarray, first: int, store: Datastore, path: Path) -> None:
    values = read_rows(store.values, first, first + len(labels))
    if len(values) < len(labels) or (values != labels[: len(values)]).any():
        at = len(values) if len(values) < len(labels) else int((values != labels).argmax())
        have = f"value {values[at]}" if at < len(values) else "no entry"
        raise ArtifactError(
            f"{path}: row {first + at} has label {labels[at]} but datastore {store.dir} has {have} there; these "
            "targets were built from another datastore."
        )


def write_csr(files: list[Path], schema, work: Path, num_positions: int, nnz: int) -> None:
    """offsets [N+1] int64 (a running sum of ``id_cnt``), ids [nnz] int32 and probs [nnz] fp16, batch by batch."""
    with NpyAppender(work / OFFSETS, np.int64, length=num_positions + 1) as offsets:
        with (
            NpyAppender(work / IDS, np.int32, length=nnz) as ids,
            NpyAppender(work / PROBS, np.float16, length=nnz) as probs,
        ):
            offsets.append([0])
            for _, batch in record_batches(files, schema):
                counts = batch.column("id_cnt").to_numpy().astype(np.int64)
                offsets.append(ids.count + np.cumsum(counts))
                ids.append(batch.column("token_id").flatten().to_numpy())
                probs.append(batch.column("prob").flatten().to_numpy())


def import_index(index_file: Path, datastore: Path, out: Path, overwrite: bool) -> Path:
    """An official FAISS index over the imported ``datastore``, copied byte for byte beside an index meta.json."""
    import faiss

    from lightning_memdec.retrieval.index_plan import plan_index

    store = Datastore(datastore)
    if not index_file.is_file():
        raise ArtifactError(f"--index {index_file} is not a file; give the official .index file (build_index.py).")
    try:
        index = faiss.read_index(str(index_file), faiss.IO_FLAG_MMAP)  # inverted lists mapped, not read into RAM
    except RuntimeError as err:
        raise ArtifactError(f"--index {index_file} is not a FAISS index ({err}).") from err
    check_official_index(index, store, index_file)
    factory, nprobe = index_factory(index), index_nprobe(index)
    work = start_work_dir(out, {"index": file_identity(index_file), "datastore": store.identity()}, overwrite)
    with discarded_on_error(work):
        shutil.copyfile(index_file, work / INDEX)
    plan = plan_index(index.ntotal, index.d, factory=factory, nprobe=nprobe)
    meta = base_meta(
        "index",
        factory=factory,
        dim=int(index.d),
        ntotal=int(index.ntotal),
        metric="squared_l2",
        nprobe=nprobe,
        train_size=None,
        plan={"index_bytes": plan.index_bytes, "flops_per_query": plan.flops_per_query, "notes": plan.notes},
        recall=None,
        datastore=str(store.dir.resolve()),
        datastore_identity=store.identity(),
        tokenizer=store.tokenizer,
        imported_from=str(index_file.resolve()),
    )
    return publish(work, out, meta)


def check_official_index(index, store: Datastore, path: Path) -> None:
    """Size, dimension and metric must be the datastore's, and its ids a permutation of 0..N-1 (row i = entry i)."""
    import faiss

    if index.d != store.dim or index.ntotal != len(store):
        raise ArtifactError(
            f"index {path} holds {index.ntotal} keys of {index.d} dims, but datastore {store.dir} has {len(store)} "
            f"keys of {store.dim}; give the index built from that datastore."
        )
    if index.metric_type != faiss.METRIC_L2:
        raise ArtifactError(f"index {path} does not use squared L2 distances (the official and this package's).")
    seen = np.zeros(len(store), dtype=bool)
    for ids in stored_ids(index):
        if len(ids) and (ids.min() < 0 or ids.max() >= len(store) or seen[ids].any() or len(np.unique(ids)) < len(ids)):
            raise ArtifactError(
                f"index {path} stores ids outside 0..{len(store) - 1} or an id twice; it was not built with "
                "add_with_ids(keys, arange(N)) over this datastore."
            )
        seen[ids] = True
    if not seen.all():
        raise ArtifactError(f"index {path} lacks id {int((~seen).argmax())}; rebuild it over the whole datastore.")


def stored_ids(index):
    """The ids an index returns, list by list (IVF), at once (IDMap), or implicitly 0..ntotal-1 (flat indexes)."""
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        yield faiss.vector_to_array(index.id_map)
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        yield np.arange(index.ntotal)
        return
    lists = ivf.invlists
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            yield faiss.rev_swig_ptr(lists.get_ids(number), size).copy()


def index_factory(index) -> str:
    """The factory string of an official index (IVF-PQ from build_index.py; IVF-Flat, Flat and IDMap also read)."""
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        return "IDMap," + index_factory(faiss.downcast_index(index.index))
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return "Flat"
    if isinstance(ivf, faiss.IndexIVFPQ):
        nbits = int(ivf.pq.nbits)
        return f"IVF{ivf.nlist},PQ{ivf.pq.M}" + ("" if nbits == 8 else f"x{nbits}")
    return f"IVF{ivf.nlist},Flat"


def index_nprobe(index) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nprobe)
    except RuntimeError:
        return 1


@contextlib.contextmanager
def discarded_on_error(work: Path):
    """Removes the work directory when the block fails, so a refused import leaves nothing behind."""
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
