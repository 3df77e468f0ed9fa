"""Left-padded batches of token rows: every row ends at the last column, where a next-token output is read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["left_pad", "left_padded_batches"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, W]`` (W the longest row), rows right-aligned, pads masked out.

    An empty row is all padding (a caller that reads its last column must not have one).

    Pair with :func:`~lightning_memdec.hf.loading.position_ids_from_mask` so that padding does not shift positions.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    return ids, mask


def left_padded_batches(
    rows: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(row indices, input_ids, attention_mask)`` per batch, longest rows first so that similar lengths share one.

    Ties keep their input order (a stable sort), so the batches, and hence the results, are deterministic.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        yield (batch, *left_pad([rows[i] for i in batch], pad_id))
