"""The sparse Memory Decoder loss equals the paper's dense computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_memdec.kernels.memdec_loss import (
    LOSS_KERNELS,
    LossOutput,
    memdec_loss,
    next_token_ce,
    sparse_kl,
)

B, T, V, M = 2, 5, 37, 6


def make_batch(seed=0, dtype=torch.float32, mask_frac=0.7, pad=2):
    """Logits, labels, padded sparse targets (last `pad` entries of each row have prob 0) and a mask."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:M] for _ in range(B * T)]).view(B, T, M)
    probs = torch.rand(B, T, M, generator=g)
    probs[..., M - pad :] = 0
    probs = probs / probs.sum(-1, keepdim=True)
    ids[..., M - pad :] = 0  # padding convention: id 0, prob 0
    mask = torch.rand(B, T, generator=g) < mask_frac
    mask[0, 0] = True
    mask[0, 1] = False
    return logits, labels, ids, probs, mask


def dense_reference(logits, labels, ids, probs, mask, beta):
    """The paper's path: dense p rows, F.kl_div(batchmean) over selected rows + F.cross_entropy.

    scatter_add_, not scatter_: a padding id may coincide with a real one and must add 0, not overwrite.
    """
    dense = torch.zeros(*ids.shape[:-1], logits.shape[-1]).scatter_add_(-1, ids, probs)
    logq = F.log_softmax(logits.float(), dim=-1)[mask]
    kl = F.kl_div(logq, dense[mask], reduction="batchmean")
    ce = F.cross_entropy(logits.float()[mask], labels[mask])
    return beta * kl + (1 - beta) * ce, kl, ce


def loss_and_grad(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, x.grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_value_and_gradient_match_dense(beta, kernel):
    logits, labels, ids, probs, mask = make_batch()
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, beta)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, beta=beta, kernel=kernel)
    assert isinstance(out, LossOutput)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.loss, beta * out.kl + (1 - beta) * out.ce)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_kl_and_ce_alone_and_their_gradients(kernel):
    logits, labels, ids, probs, mask = make_batch(seed=1)
    kl, g_kl = loss_and_grad(sparse_kl, logits, ids, probs, mask, kernel=kernel)
    ce, g_ce = loss_and_grad(next_token_ce, logits, labels, mask, kernel=kernel)
    (_, ref_kl, _), g_ref_kl = loss_and_grad(lambda x: dense_reference(x, labels, ids, probs, mask, 1.0), logits)
    (_, _, ref_ce), g_ref_ce = loss_and_grad(lambda x: dense_reference(x, labels, ids, probs, mask, 0.0), logits)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_kl, g_ref_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ce, g_ref_ce, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_kl_and_ce_outputs_are_separately_differentiable(kernel):
    """Backward through an arbitrary mix of the returned kl and ce matches the dense mix."""
    logits, labels, ids, probs, mask = make_batch(seed=2)
    x = logits.clone().requires_grad_(True)
    out = memdec_loss(x, labels, ids, probs, mask, kernel=kernel)
    (2.0 * out.kl - 0.25 * out.ce).backward()
    y = logits.clone().requires_grad_(True)
    _, kl, ce = dense_reference(y, labels, ids, probs, mask, 0.5)
    (2.0 * kl - 0.25 * ce).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_masked_positions_carry_no_loss_and_zero_gradient(kernel):
    logits, labels, ids, probs, mask = make_batch(seed=3)
    labels = labels.masked_fill(~mask, -100)  # ignore_index convention: never read off the mask
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, kernel=kernel)
    assert (g[~mask] == 0).all()
    # Garbage (even inf/NaN) in masked-out rows changes neither the loss nor the other rows' gradient.
    junk = logits.clone()
    junk[~mask] = float("nan")
    junk[~mask, 0] = float("inf")
    ids2 = ids.masked_fill(~mask[..., None], 10**6)
    out2, g2 = loss_and_grad(
        memdec_loss, junk, labels, ids2, probs.masked_fill(~mask[..., None], 0.3), mask, kernel=kernel
    )
    assert torch.equal(torch.stack(out), torch.stack(out2))
    assert torch.equal(g, g2)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_padding_entries_do_not_matter(kernel):
    logits, labels, ids, probs, mask = make_batch(seed=4)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, kernel=kernel)
    pad = probs == 0
    for new_id in (1, V - 1, -1):  # other valid ids, and an invalid one: still ignored
        out2, g2 = loss_and_grad(memdec_loss, logits, labels, ids.masked_fill(pad, new_id), probs, mask, kernel=kernel)
        assert torch.equal(torch.stack(out), torch.stack(out2))
        assert torch.equal(g, g2)
    # A padded id pointing at a -inf logit must not turn 0 · (−inf) into NaN.
    x = torch.cat([logits, torch.full((B, T, 1), float("-inf"))], dim=-1)  # extra token V, never a target
    out3, g3 = loss_and_grad(memdec_loss, x, labels, ids.masked_fill(pad, V), probs, mask, kernel=kernel)
    assert torch.equal(torch.stack(out), torch.stack(out3))
    assert torch.equal(g3[..., :V], g) and (g3[..., V] == 0).all()


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_empty_mask_gives_zero_with_graph(kernel):
    logits, labels, ids, probs, _ = make_batch(seed=5)
    mask = torch.zeros(B, T, dtype=torch.bool)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, kernel=kernel)
    assert out.loss.requires_grad
    assert torch.equal(torch.stack(out), torch.zeros(3))
    assert torch.equal(g, torch.zeros_like(logits))


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_bf16_logits(kernel):
    logits, labels, ids, probs, mask = make_batch(seed=6, dtype=torch.bfloat16)
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, 0.5)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, kernel=kernel)
    assert out.loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)  # fp32 math on the same bf16 inputs
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2, atol=1e-4)


def test_stored_dtypes_chunking_and_noncontiguous_logits():
    """int32 ids / fp16 probs as stored, tiny chunks, and a shifted (non-viewable) logits slice."""
    logits, labels, ids, probs, mask = make_batch(seed=7)
    full = torch.cat([logits, torch.randn(B, 1, V)], dim=1)  # [B, T+1, V]; drop the last step like a shift
    probs16 = probs.half()
    ref, g_ref = loss_and_grad(lambda x: dense_reference(x[:, :-1], labels, ids, probs16.float(), mask, 0.5), full)
    x = full.clone().requires_grad_(True)
    assert not x[:, :-1].is_contiguous()
    out = memdec_loss(x[:, :-1], labels, ids.int(), probs16, mask, chunk_elements=2 * V)
    out.loss.backward()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g_ref, rtol=1e-5, atol=1e-7)
    # Viewable logits with a mask, in chunks: rows addressed by flat index.
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, 0.5)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, chunk_elements=2 * V)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    # All-true mask, bf16 (so not the fused fp32 path), in chunks: rows read by slicing.
    full_mask = torch.ones(B, T, dtype=torch.bool)
    half = logits.bfloat16()
    ref, g_ref = loss_and_grad(dense_reference, half, labels, ids, probs, full_mask, 0.5)
    out, g = loss_and_grad(memdec_loss, half, labels, ids, probs, None, chunk_elements=3 * V)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2, atol=1e-4)


def test_no_extra_vocab_sized_tensor_is_saved_for_backward():
    """bf16: only `logits` itself (no fp32 log-softmax, no dense target) is kept until backward."""
    logits, labels, ids, probs, mask = make_batch(seed=8, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = memdec_loss(x, labels, ids, probs, mask)
    big = [t for t in saved if t.numel() >= B * T * V]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved if t is not big[0]) < B * T * (3 * M + 4)
    out.loss.backward()


def test_rejects_bad_inputs():
    logits, labels, ids, probs, mask = make_batch()
    with pytest.raises(ValueError):
        memdec_loss(logits, labels, ids, probs, mask, beta=1.5)
    with pytest.raises(ValueError):
        memdec_loss(logits, labels, ids, probs[..., :-1], mask)
    with pytest.raises(ValueError):
        memdec_loss(logits, labels, ids, probs, mask.long())


def test_fp32_gradient_is_the_forward_buffer_and_retain_graph_recomputes():
    """fp32, all rows: forward's exp buffer becomes the gradient; a second backward recomputes it."""
    logits, labels, ids, probs, _ = make_batch(seed=9)
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, torch.ones(B, T, dtype=torch.bool), 0.5)
    x = logits.clone().requires_grad_(True)
    out = memdec_loss(x, labels, ids, probs)
    buf_ptr = out.kl.grad_fn.buf.data_ptr()
    out.loss.backward(retain_graph=True)
    assert x.grad.data_ptr() == buf_ptr  # no second [B, T, V] tensor for the gradient
    torch.testing.assert_close(x.grad, g_ref, rtol=1e-5, atol=1e-7)
    out.loss.backward()  # accumulates a recomputed, identical gradient
    torch.testing.assert_close(x.grad, 2 * g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_no_grad_forward_keeps_no_buffer_and_gives_same_values(kernel):
    logits, labels, ids, probs, _ = make_batch(seed=10)
    x = logits.clone().requires_grad_(True)
    with_grad = memdec_loss(x, labels, ids, probs, kernel=kernel)
    with torch.no_grad():
        without = memdec_loss(x, labels, ids, probs, kernel=kernel)
    assert without.loss.grad_fn is None
    assert torch.equal(torch.stack(with_grad).detach(), torch.stack(without))


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_float64_logits_value_and_gradient_match_dense(kernel):
    """float64 logits (e.g. a model run in double for a gradient check) once crashed the backward's scatter."""
    logits, labels, ids, probs, mask = make_batch(seed=5, dtype=torch.float64)
    logits.requires_grad_(True)
    out = memdec_loss(logits, labels, ids, probs, mask, beta=0.5, kernel=kernel)
    out.loss.backward()
    assert logits.grad.dtype == torch.float64
    ref_logits = logits.detach().clone().requires_grad_(True)
    want, _, _ = dense_reference(ref_logits, labels, ids, probs, mask, 0.5)
    want.backward()
    torch.testing.assert_close(out.loss.double(), want.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-6)
