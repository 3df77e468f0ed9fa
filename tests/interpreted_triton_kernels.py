"""The Triton kernels, run on the CPU by Triton's interpreter, against their torch references: the GPU exact
search's (kernels.threshold_select.collect_below over the addmm scores, retrieval.exact_search.exact_distances) and
the loss's row passes (kernels.memdec_loss_rows.TORCH_ROW_OPS, and the whole loss against the chunked kernel).

Run by tests/test_threshold_select.py in a process of its own started with ``TRITON_INTERPRET=1``: Triton reads it
when it is first imported (its own ``tl.sum``, ``tl.cumsum`` are Triton functions too), and Lightning imports Triton
long before a test module could set it.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_memdec.kernels import memdec_loss_triton, threshold_select_triton
from lightning_memdec.kernels.memdec_loss import memdec_loss
from lightning_memdec.kernels.memdec_loss_rows import TORCH_ROW_OPS, RowOps, row_loss_terms, row_view
from lightning_memdec.kernels.threshold_select import candidate_buffers, collect_below
from lightning_memdec.retrieval.exact_search import exact_distances, ranking_scores

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/test_threshold_select.py does)", allow_module_level=True)


def buffer_sets(scores, ids, counts):
    """Per row, {id: score} of the filled slots (their order is the kernel's scheduling)."""
    return [{i: s for i, s in zip(ids[r].tolist(), scores[r].tolist()) if i >= 0} for r in range(len(counts))]


@pytest.mark.parametrize("append", threshold_select_triton.APPENDS)
@pytest.mark.parametrize("tiles", [threshold_select_triton.Launch().tiles, (32, 64, 16)])
@pytest.mark.parametrize("with_own", [False, True])
def test_fused_product_and_selection_equal_the_torch_reference(with_own, tiles, append):
    """150 queries × 700 keys of d = 80: partial tiles on every axis, a key offset (a later block), own keys inside
    and outside the block, τ midway between two scores (so accumulation order cannot move a key across it), and a
    buffer the wider rows overflow. fp16 only: the interpreter's bf16 products are wrong (2.7e10 off on 16 × 16
    normal inputs, Triton 3.9), so exact_search calls the kernel with fp16 alone."""
    torch.manual_seed(0)
    n, num_keys, dim, offset = 150, 700, 80, 50
    queries, keys = torch.randn(n, dim).half(), torch.randn(num_keys, dim).half()
    norms = keys.float().square().sum(1)
    score = ranking_scores(queries.float(), keys.float(), norms, False)
    own = torch.randint(0, num_keys + 100, (n,)) + offset if with_own else None
    if own is not None:
        local = own - offset
        inside = ((local >= 0) & (local < num_keys)).nonzero().squeeze(1)
        score[inside, local[inside]] = math.inf
    ranked = score.sort(1).values
    wanted = torch.randint(5, 90, (n,))  # keys under τ per row; over 64 the buffer overflows
    tau = (ranked.gather(1, wanted[:, None] - 1) + ranked.gather(1, wanted[:, None])).squeeze(1) / 2
    want = candidate_buffers(n, 64, "cpu")
    collect_below(score, tau, offset, want)
    got = candidate_buffers(n, 64, "cpu")
    launch = threshold_select_triton.Launch(tiles=tiles, append=append)
    threshold_select_triton.collect_below_fused(queries, keys, norms, tau, own, offset, got, launch)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.counts, wanted.int())
    for row, (g, w) in enumerate(zip(buffer_sets(*got), buffer_sets(*want))):
        if want.counts[row] <= 64:  # an overflowing row keeps whichever 64 came first: only its count is defined
            assert g.keys() == w.keys() and list(g.values()) == pytest.approx([w[i] for i in g], rel=1e-5, abs=1e-4), (
                row
            )
        else:
            assert len(g) == 64 and all(score[row, i - offset] <= tau[row] for i in g)


def test_exact_search_calls_the_fused_kernels_as_on_a_gpu(monkeypatch):
    """exact_search's GPU branch, which the CPU never takes: the kernels handed to it here, fp16 products, five key
    blocks (the last partial) with own ids in later ones; the neighbours are float64 brute force's and topk's."""
    from test_exact_search import assert_same_neighbours, brute_force

    import lightning_memdec.retrieval.exact_search as search

    calls = {"collect_below_fused": 0, "gathered_sq_distances": 0}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return getattr(threshold_select_triton, name)(*args, **kwargs)

        return call

    kernels = SimpleNamespace(**{name: counted(name) for name in calls})
    monkeypatch.setattr(search, "triton_kernels", lambda device: kernels)
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((4_000, 32)).astype(np.float16)
    own = np.concatenate([rng.integers(0, 4_000, 20), [3_999, 2_100, 5]])
    queries = keys[own].astype(np.float32) + 0.05 * rng.standard_normal((len(own), 32)).astype(np.float32)
    k, resident = 100, torch.from_numpy(keys)
    settings = {"compute_dtype": torch.float16, "block_size": 900}
    got = search.exact_search(queries, resident, k, own, selection="threshold", **settings)
    assert calls == {"collect_below_fused": 5, "gathered_sq_distances": 1}
    assert_same_neighbours(got, brute_force(queries, keys, k, exclude=own))
    topk = search.exact_search(queries, resident, k, own, selection="topk", **settings)
    assert torch.equal(got[1], topk[1])  # the fused re-ranking sums in another order: distances to float rounding
    torch.testing.assert_close(got[0], topk[0], rtol=1e-5, atol=1e-4)


def test_gathered_distances_equal_the_torch_rerank():
    torch.manual_seed(1)
    queries, keys = torch.randn(37, 100), torch.randn(500, 100).half()
    ids = torch.randint(-1, 500, (37, 150))  # −1: a missing neighbour
    got = threshold_select_triton.gathered_sq_distances(queries, keys, ids)
    want = exact_distances(queries, keys, ids)
    assert torch.equal(torch.isinf(got), ids < 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN and −inf rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_passes_equal_the_torch_reference(dtype):
    """Strided rows (a padded vocabulary's slice) over several blocks and a partial one, written into the padded width
    (0 past the vocabulary); a NaN row and an all −inf row whose coefficient is 0 get 0; elementwise only, so bf16
    runs under the interpreter too."""
    torch.manual_seed(2)
    wide = (4 * torch.randn(9, 1000 + 24)).to(dtype)
    wide[3] = float("nan")
    wide[5] = float("-inf")
    rows = row_view(wide[:, :1000])
    got_lse = memdec_loss_triton.row_logsumexp(rows, block=256)
    want_lse = TORCH_ROW_OPS.logsumexp(rows)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5, equal_nan=True)
    coef = torch.rand(9)
    coef[[3, 5]] = 0
    got, want = (torch.full((9, 1024), 7.0, dtype=dtype) for _ in range(2))  # a padded vocabulary's, not zeroed
    memdec_loss_triton.scaled_softmax(rows, want_lse, coef, got, block=256)
    TORCH_ROW_OPS.scaled_softmax(rows, want_lse, coef, want)
    assert (got[[3, 5]] == 0).all() and (got[:, 1000:] == 0).all()
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_with_the_triton_row_passes_equals_the_chunked_loss(dtype):
    """The whole loss, the label sharing a support id and padding ids colliding, through the Triton passes."""
    torch.manual_seed(3)
    b, t, v, m = 3, 7, 700, 12
    logits = (3 * torch.randn(b, t, v)).to(dtype)
    labels = torch.randint(0, v, (b, t))
    ids = torch.stack([torch.randperm(v)[:m] for _ in range(b * t)]).view(b, t, m)
    labels.view(-1)[:5] = ids.view(-1, m)[:5, 3]
    probs = torch.rand(b, t, m).masked_fill(torch.arange(m) >= m - 3, 0)
    probs = probs / probs.sum(-1, keepdim=True)
    ids = ids.masked_fill(probs == 0, 0)
    mask = torch.rand(b, t) < 0.8
    triton_ops = RowOps(memdec_loss_triton.row_logsumexp, memdec_loss_triton.scaled_softmax)
    results = []
    for run in ("triton", "chunked"):
        x = logits.clone().requires_grad_(True)
        if run == "triton":  # the logits given with a padded vocabulary's columns, as the module gives them
            padded = torch.cat([x, torch.zeros(b, t, 36, dtype=dtype)], dim=-1)
            kl, ce = row_loss_terms(padded, mask, ids, probs, labels, triton_ops, vocab_size=v)
            loss = 0.5 * kl + 0.5 * ce
        else:
            loss = memdec_loss(x, labels, ids, probs, mask).loss
        loss.backward()
        results.append((loss.detach(), x.grad.float()))
    (loss, grad), (want_loss, want_grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad, want_grad, rtol=tolerance, atol=1e-7)
