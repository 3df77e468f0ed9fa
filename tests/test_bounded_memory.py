"""Stage memory is O(chunk), not O(N): rows are read and written without leaving file pages mapped, merges stream,
and each blocked path gives the same result as the unblocked one."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from memory import mapped_rss

from lightning_memdec import npy_rows
from lightning_memdec.npy_rows import NpyStream, create_npy, gather_rows, read_rows, write_rows

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
    stream = NpyStream(tmp_path / "stream.npy", data.dtype, data.shape)
    for lo in range(0, len(data), 999):
        stream.write(data[lo : lo + 999])
    stream.close()
    whole = (tmp_path / "whole.npy").read_bytes()
    assert (tmp_path / "pwrite.npy").read_bytes() == whole and (tmp_path / "stream.npy").read_bytes() == whole
    short = NpyStream(tmp_path / "short.npy", data.dtype, data.shape)
    short.write(data[:10])
    with pytest.raises(ValueError, match="got 10 of its 20000 rows"):
        short.close()
