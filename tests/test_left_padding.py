"""Left-padded batching, the one definition downstream and the lm_eval bridge share, against a direct layout."""

from __future__ import annotations

import pytest
import torch

from lightning_memdec.hf.left_padding import left_pad, left_padded_batches
from lightning_memdec.hf.loading import position_ids_from_mask


def test_left_pad_right_aligns_rows_and_masks_the_padding():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    # positions count real tokens only, so a padded row is numbered as if unpadded
    assert position_ids_from_mask(mask, 3)[:2].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batches_take_longest_rows_first_and_cover_every_row_once():
    rows = [[1], [2, 2, 2], [3, 3], [4, 4, 4], [5, 5]]
    got = list(left_padded_batches(rows, batch_size=2, pad_id=9))
    assert [batch for batch, _, _ in got] == [[1, 3], [2, 4], [0]]  # stable: ties in input order
    for batch, ids, mask in got:
        width = max(len(rows[i]) for i in batch)
        for r, i in enumerate(batch):
            expected = [9] * (width - len(rows[i])) + rows[i]
            assert ids[r].tolist() == expected
            assert mask[r].tolist() == [0] * (width - len(rows[i])) + [1] * len(rows[i])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(left_padded_batches(rows, batch_size=0, pad_id=0))
