"""The Memory Decoder loss by whole rows: two passes over the logits in all, no host synchronisation.

Why: :mod:`kernels.memdec_loss` selects the rows that carry loss with ``nonzero`` (a host sync in the middle of the
step) and makes about seven passes of fp32 temporaries over bf16 logits, forward and backward; on an H200 the loss
cost about 10 ms of a 72 ms GPT-2-small step (benchmarks/results/gpu-h200-2026-12-04-fit-search.txt, memdec vs CE).
Here every row is processed and the mask is a row weight:

* forward: one read of the logits gives each row's logsumexp (:attr:`RowOps.logsumexp`); the target terms are gathers
  of ``[rows, M]`` logits.
* backward: one read and one write give ``softmax(z) · coef`` in the logits' dtype (:attr:`RowOps.scaled_softmax`);
  then the few target entries are overwritten with their exact values, computed in fp32 from the gathered logits.

The overwrite must give each id one value: the label may also be a support id, and padding entries (probability 0)
carry any id. So every entry's value is computed with the total weight of its id (the label's weight joined to the
support entry of the same id) and padding entries are pointed at the row's anchor (its label, or its first support
entry for the KL alone), whose value they then repeat.

:data:`TORCH_ROW_OPS` are the reference; on a GPU the Triton kernels of :mod:`kernels.memdec_loss_triton` do the same
in one pass each. Values and gradients equal :mod:`kernels.memdec_loss`'s (``tests/test_losses.py``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RowOps", "TORCH_ROW_OPS", "check_mask", "row_ops", "row_view", "row_loss_terms"]


class RowOps(NamedTuple):
    """The two passes over ``rows`` [N, V] (any float dtype, rows possibly strided, columns contiguous).

    ``logsumexp(rows)`` → fp32 [N]; ``scaled_softmax(rows, lse, coef, out)`` writes ``exp(rows − lse) · coef`` into
    ``out`` [N, W ≥ V] (contiguous, its own dtype), 0 in the rows whose ``coef`` is 0 whatever their logits and in the
    columns past V (a padded vocabulary's, whose gradient is 0)."""

    logsumexp: Callable[[Tensor], Tensor]
    scaled_softmax: Callable[[Tensor, Tensor, Tensor, Tensor], None]


def _torch_logsumexp(rows: Tensor) -> Tensor:
    return torch.logsumexp(rows.float(), dim=1)


def _torch_scaled_softmax(rows: Tensor, lse: Tensor, coef: Tensor, out: Tensor) -> None:
    scaled = torch.exp(rows.float() - lse[:, None]) * coef[:, None]
    out[:, : rows.shape[1]] = torch.where(coef[:, None] != 0, scaled, 0.0)
    out[:, rows.shape[1] :] = 0


TORCH_ROW_OPS = RowOps(_torch_logsumexp, _torch_scaled_softmax)


def row_ops(device: torch.device) -> RowOps:
    """The Triton kernels where ``device`` is a GPU and Triton is installed, else :data:`TORCH_ROW_OPS`."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return TORCH_ROW_OPS
    from lightning_memdec.kernels import memdec_loss_triton

    return RowOps(memdec_loss_triton.row_logsumexp, memdec_loss_triton.scaled_softmax)


def row_view(logits: Tensor) -> Tensor | None:
    """``logits`` as ``[N, V]`` rows without a copy, or None. Rows may be strided: ``logits[..., :V]`` of a
    decoder whose vocabulary is padded (to a multiple of 64) is read in place, padding columns never touched."""
    if logits.stride(-1) != 1:
        return None
    lead, strides = logits.shape[:-1], logits.stride()[:-1]
    if any(strides[i] != lead[i + 1] * strides[i + 1] for i in range(len(lead) - 1)):
        return None
    row_stride = strides[-1] if lead else logits.shape[-1]
    return logits.as_strided((lead.numel(), logits.shape[-1]), (row_stride, 1))


def check_mask(logits: Tensor, mask: Tensor) -> None:
    """Refuse a mask that is not one bool per position of ``logits`` [..., V]: either kernel would read other values
    or another layout as something else (0/2 ints as weights, a transposed mask with the same count as rows)."""
    if logits.dim() < 2 or mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must match logits {tuple(logits.shape)} minus the vocab dim")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")


class _RowLoss(torch.autograd.Function):
    """(kl, ce) means over the rows whose weight is 1, all rows processed (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, vocab_size, weight, target_ids, target_probs, labels, ops):
        # rows: [N, V] of logits [..., W ≥ V], made here so that the graph holds no view of the logits (the gradient
        # is written whole, 0 past V)
        rows = row_view(logits)[:, :vocab_size]
        count = weight.sum()
        inv_n = 1.0 / count.clamp(min=1.0)  # no row carries loss: 0, not 0/0
        lse = ops.logsumexp(rows)
        kl = ce = torch.zeros((), device=logits.device)
        ids = probs = lab = None
        if target_ids is not None:
            # rows that carry no loss (and padding, p = 0) contribute nothing, whatever their ids
            probs = torch.where(weight[:, None] > 0, target_probs.reshape(len(rows), -1).float(), 0.0)
            ids = torch.where(probs > 0, target_ids.reshape(len(rows), -1).long(), 0)
            logq = rows.gather(1, ids).float() - lse[:, None]
            kl = (torch.xlogy(probs, probs) - torch.where(probs > 0, probs * logq, 0.0)).sum() * inv_n
        if labels is not None:
            lab = torch.where(weight > 0, labels.reshape(-1).long(), 0)
            nll = lse - rows.gather(1, lab[:, None]).squeeze(1).float()
            ce = torch.where(weight > 0, nll, 0.0).sum() * inv_n
        ctx.ops, ctx.vocab_size = ops, vocab_size
        ctx.save_for_backward(logits, weight, inv_n, lse, ids, probs, lab)
        return kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl, g_ce):
        logits, weight, inv_n, lse, ids, probs, lab = ctx.saved_tensors
        rows = row_view(logits)[:, : ctx.vocab_size]
        zero = torch.zeros(len(rows), device=rows.device)
        w_kl = probs * (g_kl * inv_n) if probs is not None else None  # [N, M]
        w_ce = weight * (g_ce * inv_n) if lab is not None else zero  # [N]
        coef = (w_kl.sum(1) if w_kl is not None else zero) + w_ce  # of softmax(z), row by row
        grad = torch.empty((len(rows), logits.shape[-1]), dtype=rows.dtype, device=rows.device)
        ctx.ops.scaled_softmax(rows, lse, coef, grad)
        entry_ids, totals = _entry_weights(ids, w_kl, lab, w_ce)
        softmax = torch.exp(rows.gather(1, entry_ids).float() - lse[:, None])
        values = torch.where(coef[:, None] != 0, softmax * coef[:, None], 0.0) - totals
        grad.scatter_(1, entry_ids, values.to(grad.dtype))
        return grad.view(logits.shape), None, None, None, None, None, None


def _entry_weights(ids: Tensor | None, w_kl: Tensor | None, lab: Tensor | None, w_ce: Tensor):
    """The ids ``[N, M + 1]`` whose gradient entries get a sparse term, and the total weight of each entry's id, so
    that entries sharing an id carry the same value: the support entries, then the anchor (the label, or the first
    support id without one), with padding pointed at the anchor."""
    anchor = lab if lab is not None else ids[:, 0]
    if ids is None:
        return anchor[:, None], w_ce[:, None]
    real = w_kl != 0
    match = real & (ids == anchor[:, None])  # the support entry that is also the anchor (at most one)
    anchor_total = w_ce + torch.where(match, w_kl, 0.0).sum(1)
    entry_total = torch.where(real, w_kl + torch.where(match, w_ce[:, None], 0.0), anchor_total[:, None])
    entry_ids = torch.where(real, ids, anchor[:, None])
    return torch.cat([entry_ids, anchor[:, None]], 1), torch.cat([entry_total, anchor_total[:, None]], 1)


def row_loss_terms(
    logits: Tensor,
    mask: Tensor,
    target_ids: Tensor | None,
    target_probs: Tensor | None,
    labels: Tensor | None,
    ops: RowOps | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(kl, ce), each the mean over the positions where ``mask``, from logits ``[..., W]`` whose rows
    :func:`row_view` can address (shapes and meaning as in :func:`kernels.memdec_loss.memdec_loss`). ``ops``: the
    row passes (default: :func:`row_ops` of the logits' device). ``vocab_size``: only the first ``vocab_size`` of the
    W columns are the vocabulary (a padded one's logits, read and given their 0 gradient in place: a slice of them
    would cost its backward a zero-filled copy of the whole gradient); default: all W."""
    check_mask(logits, mask)
    rows = row_view(logits)
    if rows is None:
        raise ValueError(f"logits of shape {tuple(logits.shape)}, strides {logits.stride()} have no [N, V] row view.")
    width = rows.shape[1]
    if vocab_size is not None and not 0 < vocab_size <= width:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {width}] (the logits' last dim).")
    ops = ops or row_ops(logits.device)
    weight = mask.reshape(-1).float()
    return _RowLoss.apply(logits, vocab_size or width, weight, target_ids, target_probs, labels, ops)
