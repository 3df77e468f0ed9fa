"""The Memory Decoder training loss, computed from sparse kNN targets without any dense target tensor.

The Memory Decoder is trained (Cao et al., 2025, eq. 3) with

    L = β · KL(p_kNN ‖ p_mem) + (1 − β) · CE(y_next, p_mem),      p_mem = softmax(z),

averaged over the positions that carry loss. ``p_kNN`` is stored sparsely: per position ``M`` token ids
``i_m`` with probabilities ``p_m`` (padding entries have ``p_m = 0``). Since

    KL(p ‖ q) = Σ_y p(y) log p(y) − Σ_y p(y) log q(y)

only needs ``log q`` on the support of ``p``, and ``log q(y) = z_y − logsumexp(z)``, the loss needs only
one logsumexp per position plus gathers of the raw logits: neither the dense ``[B, T, V]`` target nor
a ``[B, T, V]`` log-softmax is ever built. The gradient is analytic,

    ∂L/∂z = (β · Σ_m p_m + (1 − β)) · softmax(z) − β · Σ_m p_m · e_{i_m} − (1 − β) · e_{y_next},

(divided by the number of positions). Memory and passes over ``[B, T, V]``:

* fp32 logits, every position carrying loss (the training case): forward writes ``exp(z − max z)`` into
  a fresh ``[B, T, V]`` buffer (logsumexp comes from its row sums); backward scales it in place, adds the
  sparse terms with ``scatter_add_`` and returns that very buffer as the gradient. One ``[B, T, V]``
  tensor in all, one exp pass.
* otherwise (bf16 logits, a mask, a second backward under ``retain_graph``): only ``logits`` itself (no
  copy) and per-position scalars are kept; rows are processed in chunks with small fp32 temporaries and
  backward recomputes ``exp(z − lse)``; only the gradient (in the logits' dtype) is ``[B, T, V]``.

Values and gradients equal ``F.kl_div(log_softmax(z), p_dense, reduction="batchmean")`` and
``F.cross_entropy`` over the selected rows (``tests/test_losses.py`` checks this).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lightning_memdec.kernels.memdec_loss_rows import check_mask, row_loss_terms, row_view

__all__ = ["LOSS_KERNELS", "LossKernel", "LossOutput", "memdec_loss", "next_token_ce", "sparse_kl"]

#: how the terms are computed, same numbers: ``chunked`` (below: the selected rows only, fp32 temporaries in chunks)
#: or ``rows`` (:mod:`kernels.memdec_loss_rows`: every row, one pass forward and one backward, Triton kernels on a
#: GPU, no host synchronisation). ``chunked`` stays the default until a GPU measures ``rows``.
LossKernel = Literal["chunked", "rows"]
LOSS_KERNELS = get_args(LossKernel)

#: fp32 elements per chunk of rows (128 MiB) where temporaries are needed (bf16 logits, masks): bounds them
#: independently of batch size while keeping kernel launches (and CPU thread-pool barriers) few.
CHUNK_ELEMENTS = 1 << 25


class LossOutput(NamedTuple):
    """``loss = beta * kl + (1 - beta) * ce``; all three are fp32 scalars and differentiable."""

    loss: Tensor
    kl: Tensor
    ce: Tensor


class _Rows:
    """The masked-in rows of ``logits[..., V]``, addressed without copying the whole tensor.

    A view ``[N, V]`` is used when the layout allows (then an all-true mask is read by plain slicing);
    otherwise (e.g. ``logits[:, :-1]`` of a contiguous tensor) rows are addressed by a tuple of indices
    over the leading dims, because ``reshape`` would silently copy all ``B·T·V`` elements.
    """

    def __init__(self, logits: Tensor, mask: Tensor):
        self.flat: Tensor | None = row_view(logits)
        if self.flat is not None:
            self.idx = (mask.reshape(-1).nonzero().squeeze(1),)
            self.all = self.idx[0].numel() == self.flat.shape[0]
        else:
            self.idx = mask.nonzero(as_tuple=True)
            self.all = False
        self.n = self.idx[0].numel()

    def chunks(self, vocab: int, chunk_elements: int):
        step = max(1, chunk_elements // max(vocab, 1))
        for start in range(0, self.n, step):
            yield start, min(start + step, self.n)

    def read(self, logits: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (of the selected ones) as an ``[rows, V]`` tensor."""
        if self.all:
            return self.flat[start:stop]
        src = self.flat if self.flat is not None else logits
        return src[tuple(i[start:stop] for i in self.idx)]

    def gather(self, logits: Tensor, cols: Tensor) -> Tensor:
        """``logits[row_r, cols[r, m]]`` for all selected rows: ``[n, M]``, touching only those elements."""
        if self.all:
            return self.flat.gather(1, cols)
        src = self.flat if self.flat is not None else logits
        return src[(*(i[:, None] for i in self.idx), cols)]

    def write(self, grad: Tensor, start: int, stop: int, rows: Tensor) -> None:
        """Store ``rows`` into the gradient rows ``start:stop`` (``grad``: contiguous, shaped like ``logits``)."""
        if self.all:
            grad.view(-1, grad.shape[-1])[start:stop].copy_(rows)
        else:
            dst = grad.view(-1, grad.shape[-1]) if self.flat is not None else grad
            dst.index_put_(tuple(i[start:stop] for i in self.idx), rows.to(grad.dtype))


def _prepare(logits: Tensor, mask: Tensor):
    check_mask(logits, mask)
    return _Rows(logits, mask)


def _exp_shifted(z: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``e = exp(z − m)`` in fp32 with ``m`` the row max, and ``s = Σ e``; ``logsumexp z = m + log s``.

    Hand-rolled because it is ~2× faster than ``torch.logsumexp`` on CPU and its ``e`` doubles as the
    unnormalised softmax of the gradient. An all −inf row gets ``m = 0`` (so ``lse = −inf``, not NaN).
    """
    m = z.amax(dim=1).float()
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.sub(z, m[:, None], out=out) if out is not None else z - m[:, None]  # bf16 − fp32 → fp32
    e.exp_()
    return e, m, e.sum(dim=1)


class _SparseMemDecLoss(torch.autograd.Function):
    """(kl, ce) means over masked positions, with an analytic gradient.

    Two strategies, same numbers: with fp32 logits and every row carrying loss (an all-true mask
    counts), forward writes ``exp(z − m)`` straight into the buffer that backward scales in place and
    returns as the gradient (one exp pass; that buffer is the gradient autograd needs anyway).
    Otherwise (bf16, a partial mask, a second backward under ``retain_graph``) only ``logits`` (no copy)
    and per-row scalars are kept, and backward recomputes ``exp(z − lse)`` chunk by chunk in fp32.
    """

    @staticmethod
    def forward(ctx, logits, mask, target_ids, target_probs, labels, chunk_elements, want_grad):
        vocab = logits.shape[-1]
        chunk_elements = chunk_elements or CHUNK_ELEMENTS
        rows = _prepare(logits, mask)
        n = rows.n
        ctx.rows, ctx.vocab, ctx.chunk_elements, ctx.n = rows, vocab, chunk_elements, n
        ctx.buf = ctx.inv_sum = None
        zero = logits.new_zeros((), dtype=torch.float32)
        if n == 0:  # nothing carries loss: 0, not 0/0, and a zero gradient in backward
            ctx.save_for_backward(logits)
            return zero, zero.clone()

        fused = want_grad and rows.all and logits.dtype == torch.float32
        buf = torch.empty(logits.shape, dtype=torch.float32, device=logits.device) if fused else None
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        sums = torch.empty(n, dtype=torch.float32, device=logits.device) if fused else None
        if fused:  # no temporaries to bound: one chunk, fewest kernels (and CPU thread-pool barriers)
            ctx.chunk_elements = chunk_elements = n * vocab
        for start, stop in rows.chunks(vocab, chunk_elements):
            out = buf.view(-1, vocab)[start:stop] if fused else None
            _, m, s = _exp_shifted(rows.read(logits, start, stop), out)
            lse[start:stop] = m + s.log()
            if fused:
                sums[start:stop] = s
        if fused:
            ctx.buf, ctx.inv_sum = buf, sums.reciprocal_()  # softmax = buf · inv_sum, row-wise

        kl = zero
        ids = probs = None
        if target_ids is not None:
            probs = target_probs[mask].float()  # [n, M]; fp16-as-stored is upcast only here
            # Padding (p = 0) may carry any id, even an invalid one: point it at 0 so the gather is safe.
            ids = torch.where(probs > 0, target_ids[mask].long(), 0)
            logq = rows.gather(logits, ids).float() - lse[:, None]
            # p log p − p log q, with p = 0 contributing exactly 0 (even where log q = −inf).
            kl_rows = torch.xlogy(probs, probs) - torch.where(probs > 0, probs * logq, 0.0)
            kl = kl_rows.sum() / n
        ce = zero
        lab = None
        if labels is not None:
            lab = labels[mask].long()
            ce = (lse - rows.gather(logits, lab[:, None]).squeeze(1).float()).sum() / n
        ctx.has_kl, ctx.has_ce = ids is not None, lab is not None
        ctx.save_for_backward(logits, lse, ids, probs, lab)
        return kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl, g_ce):
        rows, n, vocab = ctx.rows, ctx.n, ctx.vocab
        if n == 0:
            (logits,) = ctx.saved_tensors
            return torch.zeros_like(logits), None, None, None, None, None, None
        logits, lse, ids, probs, lab = ctx.saved_tensors
        g_kl = g_kl.float() if ctx.has_kl else None
        g_ce = g_ce.float() if ctx.has_ce else None
        # Row coefficient of softmax(z): g_kl·Σp (exact even if stored probs don't sum to 1) + g_ce.
        coef = torch.zeros(n, dtype=torch.float32, device=logits.device)
        if g_kl is not None:
            coef = coef + g_kl * probs.sum(1)
            w_kl = probs * (g_kl / n)
        if g_ce is not None:
            coef = coef + g_ce
            w_ce = (g_ce / n).expand(n, 1)
        coef = coef / n

        buf, ctx.buf = ctx.buf, None  # consumed: a retain_graph second backward recomputes
        if buf is not None:
            grad, coef = buf, coef * ctx.inv_sum
        else:
            grad = (torch.empty if rows.all else torch.zeros)(logits.shape, dtype=logits.dtype, device=logits.device)
        direct = rows.all and grad.dtype == torch.float32
        for start, stop in rows.chunks(vocab, ctx.chunk_elements):
            if buf is not None:  # exp(z − m) is already there
                out = grad.view(-1, vocab)[start:stop]
            else:
                z = rows.read(logits, start, stop)
                out = grad.view(-1, vocab)[start:stop] if direct else None
                # fp32 whatever the logits' dtype (bf16 and float64 alike), as in the forward pass
                out = torch.sub(z, lse[start:stop, None], out=out) if direct else z.float() - lse[start:stop, None]
                out.exp_()
            out.mul_(coef[start:stop, None])
            if g_kl is not None:
                out.scatter_add_(1, ids[start:stop], -w_kl[start:stop])
            if g_ce is not None:
                out.scatter_add_(1, lab[start:stop, None], -w_ce[start:stop])
            if not direct:
                rows.write(grad, start, stop, out)
        return grad, None, None, None, None, None, None


def _want_grad(logits: Tensor) -> bool:
    """Whether backward will run; decided outside the Function, where grad mode is still visible."""
    return torch.is_grad_enabled() and logits.requires_grad


def _check(logits: Tensor, target_ids: Tensor | None, target_probs: Tensor | None, labels: Tensor | None, mask):
    lead = tuple(logits.shape[:-1])
    if target_ids is not None:
        if target_ids.shape != target_probs.shape or tuple(target_ids.shape[:-1]) != lead:
            raise ValueError(
                f"target_ids {tuple(target_ids.shape)} and target_probs {tuple(target_probs.shape)} must both be "
                f"{lead + ('M',)} for logits {tuple(logits.shape)}"
            )
    if labels is not None and tuple(labels.shape) != lead:
        raise ValueError(f"labels {tuple(labels.shape)} must be {lead} for logits {tuple(logits.shape)}")
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=logits.device)
    return mask


def _terms(logits, mask, target_ids, target_probs, labels, chunk_elements, kernel, vocab_size=None):
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"kernel must be one of {LOSS_KERNELS}, got {kernel!r}.")
    if kernel == "rows":
        return row_loss_terms(logits, mask, target_ids, target_probs, labels, vocab_size=vocab_size)
    if vocab_size is not None:
        if not 0 < vocab_size <= logits.shape[-1]:
            raise ValueError(f"vocab_size {vocab_size} must be in [1, {logits.shape[-1]}] (the logits' last dim).")
        logits = logits[..., :vocab_size]
    args = (logits, mask, target_ids, target_probs, labels, chunk_elements, _want_grad(logits))
    return _SparseMemDecLoss.apply(*args)


def memdec_loss(
    logits: Tensor,
    labels: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.5,
    chunk_elements: int | None = None,
    kernel: LossKernel = "chunked",
    vocab_size: int | None = None,
) -> LossOutput:
    """β · KL(p_kNN ‖ softmax(logits)) + (1 − β) · CE(labels), each a mean over positions where ``mask``.

    Args:
        logits: ``[..., V]`` (e.g. ``[B, T, V]``), any float dtype; the loss is computed in fp32. Already
            aligned with the targets (shift before calling; a non-contiguous slice is fine and not copied).
        labels: ``[...]`` next-token ids; only read where ``mask`` (so ``-100`` elsewhere is fine).
        target_ids: ``[..., M]`` integer ids of p_kNN's support (int32 as stored is fine).
        target_probs: ``[..., M]`` their probabilities (fp16 as stored is fine), 0 for padding. Nonzero
            entries of a row must have distinct ids. Targets are data: no gradient flows to them.
        mask: ``[...]`` bool, the positions that carry loss; ``None`` means all.
        beta: weight of the KL term, in ``[0, 1]`` (the paper uses 0.5).
        chunk_elements: fp32 elements per chunk of rows where temporaries are needed (bf16 logits or a
            partial mask); ``None`` means :data:`CHUNK_ELEMENTS`.
        kernel: ``chunked`` or ``rows`` (:data:`LossKernel`; ``rows`` needs logits with an [N, V] row view).
        vocab_size: the logits' first ``vocab_size`` columns are the vocabulary, the rest a padding with no
            probability (a decoder's vocabulary padded to a multiple of 64); ``rows`` then writes the whole
            gradient, zeros included, where a slice's backward would fill and copy it again. None: all columns.

    Returns ``LossOutput(loss, kl, ce)``; with no masked-in position all three are 0 (with a graph and a
    zero gradient), never NaN.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    mask = _check(logits, target_ids, target_probs, labels, mask)
    kl, ce = _terms(logits, mask, target_ids, target_probs, labels, chunk_elements, kernel, vocab_size)
    return LossOutput(beta * kl + (1.0 - beta) * ce, kl, ce)


def sparse_kl(
    logits: Tensor,
    target_ids: Tensor,
    target_probs: Tensor,
    mask: Tensor | None = None,
    chunk_elements: int | None = None,
    kernel: LossKernel = "chunked",
) -> Tensor:
    """Mean over masked positions of KL(p ‖ softmax(logits)) = Σ_m p_m (log p_m − z_{i_m} + logsumexp z).

    Equals ``F.kl_div(log_softmax(logits[mask]), p_dense[mask], reduction="batchmean")``. Shapes as in
    :func:`memdec_loss`.
    """
    mask = _check(logits, target_ids, target_probs, None, mask)
    kl, _ = _terms(logits, mask, target_ids, target_probs, None, chunk_elements, kernel)
    return kl


def next_token_ce(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    chunk_elements: int | None = None,
    kernel: LossKernel = "chunked",
) -> Tensor:
    """Mean over masked positions of −log softmax(z)_y = logsumexp(z) − z_y (``F.cross_entropy`` on them)."""
    mask = _check(logits, None, None, labels, mask)
    _, ce = _terms(logits, mask, None, None, labels, chunk_elements, kernel)
    return ce
