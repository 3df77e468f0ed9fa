"""Row I/O on ``.npy`` files that leaves no file pages mapped, so a stage's resident memory stays O(block).

Every page a process touches through a memory map counts in its resident set (RSS) until the map is closed, and the
datastore's maps stay open for a whole stage: a run that reads every key once through ``store.keys[a:b]`` ends with
the whole keys file resident (330 GB for the paper's store), in every rank. These helpers read and write through
plain file I/O instead, or through a short-lived map of one bounded window of rows, so what stays resident is the
block the caller asked for:

- :func:`read_rows`: rows ``[lo, hi)`` into a new array (one ``pread``);
- :func:`gather_rows`: arbitrary rows (sorted, deduplicated, read window by window through temporary maps of at most
  :data:`WINDOW_BYTES` each);
- :func:`write_rows`: rows at a position of an existing ``.npy`` (``pwrite``; ranks write disjoint rows without
  locks);
- :class:`NpyAppender`: a new ``.npy`` written front to back in blocks, its length known or not.

:func:`open_npy` maps a ``.npy`` and keeps its file open: the reads above go to that file, so a stage reads the
input it started with even if another command publishes a new one at the same path meanwhile (reopening by path
mixed two corpora into one datastore, labelled with the first one's hash).

Arrays that are not top-level memmaps of a ``.npy`` file (plain arrays in tests, torch tensors) are indexed directly.
"""

from __future__ import annotations

import io
import mmap
import os
import weakref
from pathlib import Path

import numpy as np
from numpy.lib.format import dtype_to_descr, open_memmap, write_array_header_1_0

from lightning_memdec.io.artifact_dirs import ArtifactError

WINDOW_BYTES = 64 << 20  # the largest span of a file one gather maps at a time


def _file_backed(array) -> bool:
    """True for a memmap of a whole file region (np.load(mmap_mode=...)), not a view or slice of one."""
    return (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and array.filename is not None
        and array.flags.c_contiguous
    )


def open_npy(path: str | Path) -> np.memmap:
    """A read-only memmap of the ``.npy`` at ``path`` whose rows :func:`read_rows` and :func:`gather_rows` read from
    the file opened here (``array.source``, closed with the array), not from whatever the path names later."""
    file = open(path, "rb")
    try:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        if dtype.hasobject or fortran_order:
            raise ValueError(f"{path} holds {'objects' if dtype.hasobject else 'a Fortran-ordered array'}")
        array = np.memmap(file, dtype=dtype, mode="r", offset=file.tell(), shape=shape)
    except BaseException:
        file.close()
        raise
    array.source = file
    weakref.finalize(array, file.close)
    return array


def open_checked(directory: str | Path, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Open ``directory/name`` read-only as a memmap and check it against the shape meta.json promises."""
    path = Path(directory) / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artefact in {directory} is incomplete, rebuild it.")
    try:
        arr = open_npy(path)  # read from this file to the end, even if the path is republished meanwhile
    except ValueError as err:  # numpy raises ValueError for truncated files
        raise ArtifactError(f"{path} is truncated or corrupt ({err}); rebuild {directory}.") from err
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ArtifactError(
            f"{path} has shape {tuple(arr.shape)} and dtype {arr.dtype}, but meta.json says {tuple(shape)} {dtype}; "
            f"the file is corrupt or from another run, rebuild {directory}."
        )
    return arr


def npy_file_problem(path: Path) -> tuple[np.memmap | None, str | None]:
    """(a read-only map of the ``.npy`` at ``path``, None) when it is whole; (None, what is wrong, naming the file)
    when it is missing, its header cut or overwritten, or its size other than the header promises."""
    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as err:  # numpy's errors for a cut or overwritten header
        return None, f"{path.name} is truncated or corrupt ({err})"
    size, expected = path.stat().st_size, array.offset + array.nbytes
    if size != expected:
        return None, f"{path.name} has {size} bytes, its header promises {expected}"
    return array, None


def _source_fd(array) -> int | None:
    source = getattr(array, "source", None)
    return None if source is None or source.closed else source.fileno()


def _row_bytes(array) -> int:
    return int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize


def read_rows(array, lo: int, hi: int) -> np.ndarray:
    """A copy of ``array[lo:hi]``, read from the file without mapping it when ``array`` is a file memmap."""
    lo, hi = max(0, lo), min(len(array), hi)
    if not _file_backed(array):
        return np.array(array[lo:hi])
    fd = _source_fd(array)
    if fd is None:
        count = max(0, hi - lo) * _row_bytes(array) // array.dtype.itemsize
        flat = np.fromfile(array.filename, dtype=array.dtype, count=count, offset=array.offset + lo * _row_bytes(array))
        return flat.reshape((max(0, hi - lo), *array.shape[1:]))
    out = np.empty((max(0, hi - lo), *array.shape[1:]), dtype=array.dtype)
    view, position = memoryview(out.reshape(-1).view(np.uint8)), array.offset + lo * _row_bytes(array)
    while len(view):
        got = os.preadv(fd, [view], position)  # positioned: threads and forked loader workers share the file
        if got == 0:
            raise ArtifactError(f"{array.filename} ends before row {hi}: the file is truncated; rebuild it.")
        view, position = view[got:], position + got
    return out


def gather_rows(array, ids, window_bytes: int | None = None) -> np.ndarray:
    """``array[ids]`` (any ids, repeated or not, in any order) with each distinct row read once; a file memmap is read
    through temporary maps of one window of at most ``window_bytes`` (default :data:`WINDOW_BYTES`) at a time."""
    ids = np.asarray(ids, dtype=np.int64)
    if not _file_backed(array):
        return np.array(array[ids])
    uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    if len(uniq) and (uniq[0] < 0 or uniq[-1] >= len(array)):
        raise IndexError(f"row ids must be in [0, {len(array)}), got {uniq[0]}…{uniq[-1]}.")
    rows = np.empty((len(uniq), *array.shape[1:]), dtype=array.dtype)
    span = max(1, (window_bytes or WINDOW_BYTES) // max(1, _row_bytes(array)))
    i = 0
    while i < len(uniq):
        lo = int(uniq[i])
        j = int(np.searchsorted(uniq, lo + span))
        hi = int(uniq[j - 1]) + 1
        window = np.memmap(
            array.filename if _source_fd(array) is None else array.source, dtype=array.dtype, mode="r",
            offset=array.offset + lo * _row_bytes(array), shape=(hi - lo, *array.shape[1:]),
        )  # fmt: skip
        rows[i:j] = window[uniq[i:j] - lo]
        del window  # unmapped here: its touched pages leave this process's RSS
        i = j
    return rows[inverse].reshape(*ids.shape, *array.shape[1:])


def create_npy(path: str | Path, dtype, shape: tuple[int, ...]) -> int:
    """A new ``.npy`` of ``shape`` (its header written, the file sized, sparse: no row written); its data offset."""
    created = open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    offset = int(created.offset)
    del created  # unmapped before any row is written
    return offset


def data_offset(path: str | Path) -> int:
    """Byte offset of a ``.npy`` file's data (the length of its header)."""
    return int(np.load(path, mmap_mode="r").offset)


def write_rows(fd: int, offset: int, row_bytes: int, lo: int, rows: np.ndarray) -> None:
    """Write ``rows`` at row ``lo`` of the ``.npy`` open as ``fd`` (its data at ``offset``, ``row_bytes`` a row)."""
    data = np.ascontiguousarray(rows).tobytes()
    position, view = offset + lo * row_bytes, memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class NpyAppender:
    """A ``.npy`` written front to back by :meth:`append`, so an array never sits in memory whole; its rows have
    ``row_shape`` (``()`` for 1-D), and ``length`` rows when given (checked on every append and on close).

    numpy pads every header so the first dimension can grow to 21 digits in place; the header is written for length 0
    first and for the final length on :meth:`close`, so the file's bytes equal ``np.save``'s. Used as a context
    manager, a file left unfinished by an error keeps its length-0 header, so nobody mistakes it for a whole array.
    """

    def __init__(self, path: str | Path, dtype, row_shape: tuple[int, ...] = (), length: int | None = None):
        self.path, self.dtype, self.row_shape, self.length = Path(path), np.dtype(dtype), tuple(row_shape), length
        self.count = 0
        self.file = open(self.path, "wb")  # closed by close() or __exit__
        self.header_bytes = self.file.write(self.header(0))

    def header(self, length: int) -> bytes:
        buf = io.BytesIO()
        d = {"descr": dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length, *self.row_shape)}
        write_array_header_1_0(buf, d)
        return buf.getvalue()

    def append(self, values) -> np.ndarray:
        """Append rows ``values`` (cast to the file's dtype) and return them as written."""
        arr = np.ascontiguousarray(np.asarray(values).astype(self.dtype, copy=False))
        if arr.shape[1:] != self.row_shape or (self.length is not None and self.count + len(arr) > self.length):
            shape = (self.length, *self.row_shape)
            raise ValueError(f"block of shape {arr.shape} does not continue {self.path} {shape} at {self.count}.")
        self.file.write(memoryview(arr).cast("B"))
        self.count += len(arr)
        return arr

    def close(self) -> None:
        """Write the final header and sync the file to disk; refuse a file short of its ``length``."""
        if self.length is not None and self.count != self.length:
            self.file.close()
            raise ValueError(f"{self.path} got {self.count} of its {self.length} rows.")
        header = self.header(self.count)
        if len(header) != self.header_bytes:  # numpy's padding makes this impossible below 10^21 rows
            self.file.close()
            raise ArtifactError(f"cannot rewrite the header of {self.path} in place ({len(header)} bytes).")
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` through ``<path>.tmp.npy`` and a rename, the same bytes (C order). numpy reports a
    write the disk or ``ulimit -f`` cut short as an OSError with no errno ("153472 requested and 106432 written"),
    which no caller can tell from a bug; Python's own write raises ENOSPC, EDQUOT or EFBIG. A failed write leaves no
    temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npy")
    array = np.ascontiguousarray(array)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    try:
        with open(tmp, "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            file.write(memoryview(array.reshape(-1)).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
