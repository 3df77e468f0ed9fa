"""Where a corpus's text comes from, as a stream of documents: text files or a Hugging Face dataset.

A dataset is a hub name or local parquet/json/jsonl/arrow/csv/txt files, read with ``streaming=True``.
Nothing is held whole in memory, and everything a user can get wrong (a missing file, an unknown format, a wrong
column, no text at all) is found here, before any work starts.

What a document is:

- text files (``--text``): documents are separated by blank lines (:func:`iter_documents`);
- dataset rows: each non-blank row is one document (surrounding newlines dropped), or, with ``document_start``
  (a regular expression), a document runs from a row that matches it to the next one, its rows joined by newlines
  (WikiText: one row per line, articles start at a level-1 heading: ``--dataset.document_start '^ = [^=].* = $'``).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import lzma
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from lightning_memdec.io.artifact_dirs import ArtifactError, sha256_file, wrong_path
from lightning_memdec.io.embedded import resolve_text
from lightning_memdec.io.text_pieces import PIECE_CHARS

# local data files: extension → the `datasets` builder that reads it
DATA_FILE_FORMATS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
    ".csv": "csv",
    ".txt": "text",
}
ROWS_PER_BATCH = 1000
INSTALL_HINT = "reading Hugging Face datasets needs the `datasets` package: pip install 'lightning_memdec[datasets]'"


def open_documents(
    text: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    data_files: list[str] | None = None,
    text_field: str = "text",
    document_start: str | None = None,
) -> tuple[Iterator[tuple[str, bool]], list[dict]]:
    """The documents of exactly one source, lazily, as ``(text, ends_document)`` pieces (a text file's long documents
    in several, see :mod:`~lightning_memdec.io.text_pieces`), and its provenance (recorded in the corpus's meta.json).

    Raises before returning when the source is unusable or holds no document, so a failed run leaves nothing behind.
    """
    flags = (("--text", text), ("--dataset.name", dataset), ("--dataset.files", data_files))
    given = [flag for flag, value in flags if value]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one source of text: --text FILE (or embedded:<domain>/<split>), --dataset.name NAME, or "
            f"--dataset.files FILE; got {given or 'none'}."
        )
    if text and document_start is not None:
        raise ValueError(
            "--dataset.document_start splits dataset rows; text files' documents are separated by blank lines."
        )
    if text:
        paths = [resolve_text(t) for t in text]
        tables = [str(p) for p in paths if DATA_FILE_FORMATS.get(data_file_suffix(p), "text") != "text"]
        if tables:
            raise ValueError(f"{tables} hold rows, not blank-line separated text: give them with --dataset.files.")
        # a bad byte late in a large file was met only after all before it was tokenized; checked and hashed in one pass
        sources = [{"path": str(p), "sha256": check_utf8(p)} for p in paths]
        documents = (piece for p in paths for piece in iter_document_pieces(p))
        what = f"the input text {[str(p) for p in paths]}"
    else:
        pattern = compile_document_start(document_start)
        parts = dataset_parts(dataset, dataset_config, split, data_files, text_field)
        sources = [
            {**provenance, "text_field": text_field, "document_start": document_start} for _, provenance in parts
        ]
        documents = ((document, True) for document in row_documents(parts, text_field, pattern))
        what = f"the dataset {dataset!r}" if dataset else f"the data files {data_files}"
    first = next(documents, None)
    if first is None:
        raise ArtifactError(f"{what} holds no documents (every row or block is blank); give non-empty text.")
    return itertools.chain([first], documents), sources


def open_rows(
    dataset: str | None, dataset_config: str | None, split: str, data_files: list[str] | None, text_field: str
) -> tuple[Iterator[str], list[dict]]:
    """Every row's text, blank and null rows included (as ""), lazily, and the source's provenance: the rows the
    official preprocessing tokenizes one by one (:mod:`lightning_memdec.io.official_preprocessing`)."""
    if not (dataset or data_files):
        raise ValueError(
            "--separation official reads dataset rows (WikiText: one line per row), as the official preprocessing "
            "does: give --dataset.name or --dataset.files, not --text."
        )
    parts = dataset_parts(dataset, dataset_config, split, data_files, text_field)
    sources = [{**provenance, "text_field": text_field, "separation": "official"} for _, provenance in parts]
    return row_texts(parts, text_field), sources


def row_texts(parts: Iterable[tuple[Iterable[dict], dict]], text_field: str) -> Iterator[str]:
    for batches, provenance in parts:
        for batch in batches:
            if text_field not in batch:
                raise missing_column(text_field, list(batch), provenance)
            for row in batch[text_field]:
                if row is not None and not isinstance(row, str):
                    raise ValueError(
                        f"column {text_field!r} of {describe(provenance)} holds {type(row).__name__}, not text."
                    )
                yield row or ""


def compile_document_start(document_start: str | None) -> re.Pattern | None:
    if document_start is None:
        return None
    try:
        return re.compile(document_start)
    except re.error as err:
        raise ValueError(f"--dataset.document_start {document_start!r} is not a regular expression: {err}.") from err


def dataset_parts(
    dataset: str | None, dataset_config: str | None, split: str, data_files: list[str] | None, text_field: str
) -> list[tuple[Iterable[dict], dict]]:
    """(batches of rows, provenance) for a hub dataset, or one per local data file, each checked for ``text_field``."""
    paths = [check_data_file(f) for f in data_files or []]  # every file checked before any is opened
    for path in paths:
        if DATA_FILE_FORMATS[data_file_suffix(path)] in ("text", "json", "csv"):  # read as UTF-8 by datasets
            check_utf8(path)
    datasets = require_datasets()
    if not paths:
        provenance = {"dataset": dataset, "config": dataset_config, "split": split}
        rows = streamed_rows(datasets, (dataset, dataset_config), {"split": split}, text_field, provenance)
        return [(rows, provenance)]
    parts = []
    for path in paths:
        provenance = {"path": str(path), "sha256": sha256_file(path)}
        builder, kwargs = (DATA_FILE_FORMATS[data_file_suffix(path)],), {"data_files": [str(path)], "split": "train"}
        rows = streamed_rows(datasets, builder, kwargs, text_field, provenance) if has_rows(path) else []
        parts.append((rows, provenance))
    return parts


def streamed_rows(datasets, args: tuple, kwargs: dict, text_field: str, provenance: dict) -> Iterable[dict]:
    """Batches of rows of ``datasets.load_dataset(*args, **kwargs, streaming=True)``, only ``text_field`` decoded."""
    try:
        rows = datasets.load_dataset(*args, **kwargs, streaming=True)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"cannot open {describe(provenance)}: {err}. A hub dataset needs a network connection (or the local "
            f"cache); offline, give local files with --dataset.files."
        ) from err
    if check_text_field(rows.column_names, rows.features, text_field, provenance):
        rows = rows.select_columns([text_field])  # the other columns are never decoded
    return rows.iter(batch_size=ROWS_PER_BATCH)


def require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return datasets


def has_rows(path: Path) -> bool:
    """False for an empty file or a parquet file of no rows: they hold no text, and `datasets` fails on them."""
    if path.stat().st_size == 0:
        return False
    if DATA_FILE_FORMATS[data_file_suffix(path)] == "parquet":
        import pyarrow.parquet  # a dependency of datasets

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows > 0
    return True


def data_file_suffix(path: Path) -> str:
    return path.suffix.lower()


def check_data_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{wrong_path(path, 'data file', want_dir=False)}.")
    if data_file_suffix(path) not in DATA_FILE_FORMATS:
        raise ValueError(
            f"data file {path}: unknown format {path.suffix!r}; the extension must be one of "
            f"{sorted(DATA_FILE_FORMATS)} (rename it, or convert it to one of them)."
        )
    return path


def check_text_field(columns: list[str] | None, features, text_field: str, provenance: dict) -> bool:
    """The column must exist and hold strings; False when the columns are not known yet (as some streamed datasets'
    are not), so each batch is checked instead."""
    if columns is None:
        return False
    if text_field not in columns:
        raise missing_column(text_field, columns, provenance)
    dtype = getattr(features[text_field], "dtype", None) if features is not None else None
    if dtype is not None and dtype not in ("string", "large_string"):
        raise ValueError(
            f"column {text_field!r} of {describe(provenance)} holds {dtype}, not text; choose another "
            "--dataset.text_field."
        )
    return True


def describe(provenance: dict) -> str:
    if "path" in provenance:
        return f"data file {provenance['path']}"
    return f"dataset {provenance['dataset']!r} (config {provenance['config']}, split {provenance['split']})"


def missing_column(text_field: str, columns: list[str], provenance: dict) -> ValueError:
    return ValueError(
        f"{describe(provenance)} has no column {text_field!r}; its columns are {columns}: choose one with "
        "--dataset.text_field."
    )


def row_documents(
    parts: Iterable[tuple[Iterable[dict], dict]], text_field: str, document_start: re.Pattern | None
) -> Iterator[str]:
    """Documents from parts' batches of rows (``{column: [values]}``, with the part's provenance), lazily.

    The parts are one sequence of rows, so a document may run on from one data file into the next (a dataset cut
    into shards reads as it does whole); a null row counts as a blank one.
    """
    current: list[str] = []
    for row in row_texts(parts, text_field):
        if document_start is None:
            yield from non_blank(row)
        elif document_start.search(row) and current:
            yield from non_blank("\n".join(current))
            current = [row.removesuffix("\n")]
        else:
            current.append(row.removesuffix("\n"))
    if current:
        yield from non_blank("\n".join(current))


def open_text(path: str | Path):
    """A text file (``.xz`` compressed or not) opened for reading in universal-newline text mode; a UTF-8 byte-order
    mark at its start is not text (``utf-8-sig``: it would become three byte tokens of the first document)."""
    path = Path(path)
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def check_utf8(path: str | Path) -> str:
    """Refuse a file that is not UTF-8, naming the offset of its first bad byte in the (decompressed) text, by one
    streamed pass before any work; return the sha256 of the file's bytes as stored (:func:`sha256_file`'s), from the
    same pass for a plain text file (an ``.xz`` file's compressed bytes are hashed apart: a fraction of its text)."""
    path = Path(path)
    compressed = path.suffix == ".xz"
    decoder, offset, digest = codecs.getincrementaldecoder("utf-8")(), 0, hashlib.sha256()
    with lzma.open(path, "rb") if compressed else open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not compressed:
                digest.update(chunk)
            held_bytes = decoder.getstate()[0]  # the start of a character split across reads
            held = len(held_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                at = offset - held + err.start
                where = "of its decompressed text" if path.suffix == ".xz" else "(0-based)"
                raise ValueError(
                    f"{path} is not UTF-8 text: byte {at:,} {where} is 0x{(held_bytes + chunk)[err.start]:02x} "
                    f"({err.reason}); convert the file, e.g. `iconv -f latin1 -t utf-8`."
                ) from err
            if not chunk:
                return sha256_file(path) if compressed else digest.hexdigest()
            offset += len(chunk)


def not_utf8(path: str | Path, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text ({err}); convert it, e.g. `iconv -f latin1 -t utf-8`.")


def read_text(path: str | Path) -> str:
    with open_text(path) as f:
        try:
            return f.read()
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from err


def iter_document_pieces(path: str | Path, piece_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """The documents of a text file as ``(text, ends_document)`` pieces of about ``piece_chars`` characters
    (default :data:`~lightning_memdec.io.text_pieces.PIECE_CHARS`).

    Documents are separated by blank lines; surrounding newlines are dropped, blank ones skipped. Lines are read at
    most ``piece_chars`` characters at a time, so even one huge line costs the memory of a piece.
    """
    piece_chars = piece_chars or PIECE_CHARS
    with open_text(path) as f:
        parts: list[str] = []  # the current document's text not yet handed on
        size, started, at_line_start, seen_text = 0, False, True, False
        try:
            while chunk := f.readline(piece_chars):
                if at_line_start and chunk == "\n":  # a blank line ends the document
                    if seen_text:
                        yield "".join(parts), True
                    parts, size, started, seen_text = [], 0, False, False
                    continue
                text = chunk.removesuffix("\n")
                if at_line_start and started:
                    parts.append("\n")
                parts.append(text)
                size, started, at_line_start = size + len(text) + 1, True, chunk.endswith("\n")
                seen_text = seen_text or bool(text.strip())
                if size >= piece_chars and seen_text:  # a blank-looking start is held until text decides it
                    yield "".join(parts), False
                    parts, size = [], 0
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from err
        if seen_text:
            yield "".join(parts), True


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of a text file, whole (see :func:`iter_document_pieces`)."""
    parts: list[str] = []
    for text, ends in iter_document_pieces(path):
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


def read_documents(path: str | Path) -> list[str]:
    """All documents of a text file (see :func:`iter_documents`)."""
    return list(iter_documents(path))


def non_blank(document: str) -> Iterator[str]:
    """The document without surrounding newlines, unless it is blank: the one rule for what counts as text."""
    if document.strip():
        yield document.strip("\n")
