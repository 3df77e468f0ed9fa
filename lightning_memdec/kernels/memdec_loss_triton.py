"""Triton kernels of :class:`kernels.memdec_loss_rows.RowOps`: each row's logsumexp in one read of the logits, and
``softmax · coef`` in one read and one write, in the logits' own dtype with fp32 arithmetic.

Imported only where Triton is installed (on a CUDA machine it comes with torch). The tests run both on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``) against :data:`kernels.memdec_loss_rows.TORCH_ROW_OPS`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK", "row_logsumexp", "scaled_softmax"]

BLOCK = 4096  # columns a program reads at a time: 8 KB of bf16, 13 steps over GPT-2's 50,257


@triton.jit
def _row_logsumexp_kernel(x_ptr, out_ptr, vocab, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * row_stride
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)  # running max, an fp32 scalar
    s = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)  # running Σ exp(x − m)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all −inf prefix: Σ stays 0, no NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    tl.store(out_ptr + row, m + tl.log(s))  # −inf for an all −inf row


@triton.jit
def _scaled_softmax_kernel(x_ptr, lse_ptr, coef_ptr, out_ptr, vocab, row_stride, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    coef = tl.load(coef_ptr + row)
    x = tl.load(x_ptr + row * row_stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    y = tl.where(coef != 0.0, tl.exp(x - tl.load(lse_ptr + row)) * coef, 0.0)  # 0 past vocab: exp(−inf)
    tl.store(out_ptr + row * width + cols, y.to(out_ptr.dtype.element_ty), mask=cols < width)


def _check_rows(rows: torch.Tensor) -> None:
    if rows.dim() != 2 or rows.stride(1) != 1:
        raise ValueError(f"rows must be [N, V] with unit column stride, got {tuple(rows.shape)} {rows.stride()}.")


def row_logsumexp(rows: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """logsumexp of each row of ``rows`` [N, V] in fp32 [N] (``block``: a power of two)."""
    _check_rows(rows)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    _row_logsumexp_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), BLOCK=block, num_warps=8)
    return out


def scaled_softmax(
    rows: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, block: int = BLOCK
) -> None:
    """``out`` [N, W ≥ V] (contiguous) ← ``exp(rows − lse) · coef`` row by row, 0 where ``coef`` is 0 and past V."""
    _check_rows(rows)
    if out.shape[0] != rows.shape[0] or out.shape[1] < rows.shape[1] or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{rows.shape[0]}, ≥ {rows.shape[1]}], got {tuple(out.shape)}.")
    grid = (rows.shape[0], triton.cdiv(out.shape[1], block))
    lse, coef = lse.contiguous(), coef.float().contiguous()
    _scaled_softmax_kernel[grid](
        rows, lse, coef, out, rows.shape[1], rows.stride(0), out.shape[1], BLOCK=block, num_warps=8
    )
