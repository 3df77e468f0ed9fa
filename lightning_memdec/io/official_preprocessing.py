"""The token stream of the paper's preprocessing (LUMIA-Group/MemoryDecoder, ``utils/preprocess_dataset.py``).

There, every dataset row (a WikiText line, blank ones included) is tokenized on its own with the tokenizer's
default special tokens (none for GPT-2, a BOS for Llama-3) and no EOS; ``datasets.map(batched=True, num_proc=32)``
then concatenates each batch of 1000 rows of each of the 32 contiguous shards into one group, cut to a multiple of
the 1024-token block when it is longer than one block. Windows never cross groups, so the first token of a group
is never a datastore value: the official datastore's values are, group after group, ``group[1:]``.

:func:`official_groups` rebuilds exactly that: the first group whole, every later one without its first token, so
that a corpus of these groups (``memdec tokenize --separation official``) has next tokens equal to the official
datastore's ``vals`` and kNN targets' ``label``, entry for entry (``memdec import-official --corpus`` checks it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

BLOCK_SIZE = 1024  # preprocess_dataset.py --block_size default
NUM_PROC = 32  # scripts/preprocess_dataset.sh --num_proc
MAP_BATCH_ROWS = 1000  # datasets.Dataset.map's default batch_size


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Row ranges of ``datasets``' contiguous shards: the first ``num_rows % num_shards`` get one row more
    (``map`` uses no more processes than rows)."""
    num_shards = max(1, min(num_shards, num_rows))
    size, extra = divmod(num_rows, num_shards)
    starts = [i * size + min(i, extra) for i in range(num_shards + 1)]
    return list(zip(starts[:-1], starts[1:]))


def group_sizes(num_rows: int, num_proc: int = NUM_PROC, batch_rows: int = MAP_BATCH_ROWS) -> Iterator[int]:
    """Rows per group, in order: each shard's rows in batches of ``batch_rows``, the shard's last batch shorter."""
    for start, end in shard_bounds(num_rows, num_proc):
        for lo in range(start, end, batch_rows):
            yield min(batch_rows, end - lo)


def official_groups(
    encoded_rows: Iterable[list[int]],
    num_rows: int,
    block_size: int = BLOCK_SIZE,
    num_proc: int = NUM_PROC,
    batch_rows: int = MAP_BATCH_ROWS,
) -> Iterator[np.ndarray]:
    """The groups' tokens as the official datastore's values continue them (see the module docstring), lazily;
    ``encoded_rows`` are the ids of the ``num_rows`` rows in order. Empty groups are skipped."""
    rows, first = iter(encoded_rows), True
    for size in group_sizes(num_rows, num_proc, batch_rows):
        group = np.fromiter(itertools.chain.from_iterable(itertools.islice(rows, size)), dtype=np.int64)
        if len(group) >= block_size:
            group = group[: len(group) // block_size * block_size]
        group = group if first else group[1:]
        first = first and len(group) == 0
        if len(group):
            yield group
    if next(rows, None) is not None:
        raise ValueError(f"more rows than the {num_rows} counted: the dataset changed while it was read.")
