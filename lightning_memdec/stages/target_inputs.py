"""Checks of build_targets' inputs that read the datastore's files, made before any search: a bad value or key would
otherwise surface hours in, or only in ``fit``, as an error that names neither the file nor the fix."""

from __future__ import annotations

import numpy as np

from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.npy_rows import read_rows
from lightning_memdec.io.readers import KEYS, VALUES, Datastore, check_finite_keys

VALUES_BLOCK = 1 << 22  # values read at a time (16 MiB of int32)
KEYS_BLOCK_BYTES = 64 << 20  # keys read at a time
REBUILD = "rebuild the datastore (memdec build-datastore --overwrite) with the base LM and corpus of its tokenizer"


def check_values_in_vocab(store: Datastore, block: int = VALUES_BLOCK) -> None:
    """Every value must be a token id of the store's tokenizer: the targets hold them as ids, and ``fit`` indexes the
    decoder's logits with them (an id past the vocabulary fails there, in the loss). Streamed: one block in memory."""
    vocab = int(store.tokenizer["vocab_size"])
    for lo in range(0, len(store.values), block):
        values = read_rows(store.values, lo, lo + block)
        if len(values) and (values.min() < 0 or values.max() >= vocab):
            bad = np.flatnonzero((values < 0) | (values >= vocab))
            raise ArtifactError(
                f"{store.dir / VALUES} holds token id {int(values[bad[0]])} at position {lo + int(bad[0])} "
                f"({len(bad)} ids out of range in positions {lo:,}–{lo + len(values) - 1:,}), outside the "
                f"{vocab} ids of its tokenizer {store.tokenizer.get('name')!r} (meta.json); the file is corrupt or "
                f"from another tokenizer: {REBUILD}."
            )


def check_finite_store_keys(store: Datastore, block_bytes: int = KEYS_BLOCK_BYTES) -> None:
    """Every key searched must be finite: a NaN/inf key gives NaN distances, which the search reports only as a row
    with no valid neighbour. Streamed: one block of keys in memory."""
    rows = max(1, block_bytes // max(1, store.dim * store.keys.dtype.itemsize))
    for lo in range(0, len(store), rows):
        check_finite_rows(read_rows(store.keys, lo, lo + rows), lo, f"datastore {store.dir} ({KEYS})")


def check_finite_rows(keys: np.ndarray, first_row: int, source: str) -> None:
    """build-index's message (:func:`~io.readers.check_finite_keys`: the file, the count, the first position, the
    cause), and what to do for targets."""
    try:
        check_finite_keys(keys, first_row, source)
    except ArtifactError as err:
        raise ArtifactError(
            f"{err} Then rebuild that datastore (memdec build-datastore --overwrite) and build the targets again."
        ) from None
