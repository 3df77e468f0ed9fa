"""Arrow files of the paper's code (LUMIA-Group/MemoryDecoder): found, opened memory-mapped, schema-checked.

The official scripts write Arrow IPC *streams* (``pa.ipc.new_stream``): a datastore ``keys:
fixed_size_list<float16>[d], vals: int32`` (``knn_utils/saveEmbedMulti.py``) and kNN targets ``id_cnt: int32,
token_id: list<int32>, prob: list<float16>, label: int32`` (``knn_utils/saveKNNMulti.py``); ``datasets`` writes the
same format into a directory of ``*.arrow`` shards. Files are memory-mapped, so reading one column of a record batch
touches only that column's pages. pyarrow is the optional extra ``official``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lightning_memdec.io.artifact_dirs import ArtifactError, wrong_path

INSTALL_HINT = "reading the official repository's Arrow files needs pyarrow: pip install 'lightning_memdec[official]'"


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (a submodule pyarrow does not import by itself)
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return pyarrow


def arrow_files(path: str | Path, setting: str) -> list[Path]:
    """The Arrow files of ``path``: the file itself, or a directory's ``*.arrow`` files in name order (its shards)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ArtifactError(f"{wrong_path(path, setting, want_dir=False)}; give an official .arrow file or directory.")
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise ArtifactError(f"{setting} {path} holds no *.arrow file; give the official .arrow file or its directory.")
    return files


def open_reader(path: Path):
    """A record-batch reader over one memory-mapped Arrow IPC stream (or file) ``path``."""
    pa = require_pyarrow()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid as err:
        raise ArtifactError(
            f"{path} is not an Arrow IPC stream or file ({err}); give the official .arrow file."
        ) from err


def check_schema(schema, expected, path: Path) -> None:
    """Refuse a file whose columns or types differ from the official schema, naming what differs."""
    got = {field.name: field.type for field in schema}
    for name, want in ((f.name, f.type) for f in expected):
        if name not in got:
            raise ArtifactError(
                f"{path} has no column {name!r} (its columns are {list(got)}); it is not an official "
                f"{'datastore' if name in ('keys', 'vals') else 'kNN targets'} file."
            )
        if not got[name].equals(want):
            raise ArtifactError(
                f"{path}: column {name!r} is {got[name]}, but the official schema has {want}; the file was written "
                "by other code or converted: write it as the official scripts do."
            )


def record_batches(files: list[Path], expected) -> Iterator:
    """The record batches of ``files`` in order, each file's schema checked against ``expected`` as it opens."""
    for path in files:
        reader = open_reader(path)
        check_schema(reader.schema, expected, path)
        if hasattr(reader, "num_record_batches"):  # an IPC file reader is indexed, not iterated
            yield from ((path, reader.get_batch(i)) for i in range(reader.num_record_batches))
        else:
            yield from ((path, batch) for batch in reader)


def check_schemas(files: list[Path], expected) -> None:
    """Every file's schema, checked before any data is read."""
    for path in files:
        check_schema(open_reader(path).schema, expected, path)


def datastore_schema(dim: int):
    pa = require_pyarrow()
    return pa.schema([pa.field("keys", pa.list_(pa.float16(), dim)), pa.field("vals", pa.int32())])


def targets_schema():
    pa = require_pyarrow()
    return pa.schema(
        [
            pa.field("id_cnt", pa.int32()),
            pa.field("token_id", pa.list_(pa.int32())),
            pa.field("prob", pa.list_(pa.float16())),
            pa.field("label", pa.int32()),
        ]
    )


def key_dim(files: list[Path]) -> int:
    """d of the datastore's ``keys: fixed_size_list<float16>[d]`` (from the first file; all are checked later)."""
    pa = require_pyarrow()
    schema = open_reader(files[0]).schema
    field = schema.field("keys") if "keys" in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type):
        what = "no column 'keys'" if field is None else f"keys of type {field.type}"
        raise ArtifactError(
            f"{files[0]} has {what}; the official datastore has keys: fixed_size_list<float16>[d] "
            "(knn_utils/saveEmbedMulti.py)."
        )
    return field.type.list_size
