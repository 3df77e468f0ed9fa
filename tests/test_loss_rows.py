"""The row-by-row loss (kernels.memdec_loss_rows) where it differs from the chunked one: every row processed with the
mask as a weight, the sparse gradient terms written by overwriting (so ids shared by the label, a support entry and
padding must get one value), strided rows read in place. The common cases run in tests/test_losses.py for both
kernels; the Triton kernels are checked under the interpreter in tests/interpreted_triton_kernels.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_losses import B, M, T, V, dense_reference, loss_and_grad, make_batch
from test_training import TINY_DECODER, data_args

from lightning_memdec.kernels.memdec_loss import memdec_loss, next_token_ce, sparse_kl
from lightning_memdec.kernels.memdec_loss_rows import TORCH_ROW_OPS, row_loss_terms, row_ops, row_view
from lightning_memdec.training.fit import lightning_cli
from lightning_memdec.training.lightning_module import MemoryDecoderModule


def shared_ids_batch(dtype=torch.float32):
    """Targets whose ids collide in every way the overwrite must survive: the label is a support id (rows 0–3), the
    padding's id is a real support id (all rows: 0 is the third entry) and, in row 4, the label too."""
    logits, labels, ids, probs, mask = make_batch(seed=11, dtype=dtype)
    ids[..., 2] = 0
    ids[..., M - 2 :] = 0  # padding (p = 0) with the id of entry 2
    flat_ids, flat_labels = ids.view(-1, M), labels.view(-1)
    flat_labels[:4] = flat_ids[:4, 1]
    flat_labels[4] = 0
    return logits, labels, ids, probs, torch.ones_like(mask)


@pytest.fixture(params=["in_order", "reversed", "shuffled"])
def scatter_order(request, monkeypatch):
    """The order in which ``scatter_`` writes an index given twice: on a GPU it is undefined, where the CPU keeps the
    last write (the anchor column, appended last). Every entry of an id must carry the same value, so the gradient
    must not depend on it: columns written reversed or shuffled must give the same one."""
    write = torch.Tensor.scatter_
    shuffle = torch.Generator().manual_seed(0)

    def reordered(self, dim, index, src, *args, **kwargs):
        if request.param != "in_order" and dim == 1 and index.dim() == 2 and isinstance(src, torch.Tensor):
            width = index.shape[1]
            cols = (
                torch.arange(width - 1, -1, -1)
                if request.param == "reversed"
                else torch.randperm(width, generator=shuffle)
            )
            index, src = index[:, cols], src[:, cols]
        return write(self, dim, index, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "scatter_", reordered)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_ids_shared_by_label_support_and_padding_get_their_summed_gradient(beta, dtype, scatter_order):
    logits, labels, ids, probs, mask = shared_ids_batch(dtype)
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, beta)
    out, g = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, beta=beta, kernel="rows")
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    else:  # the gradient is rounded to bf16 once, from fp32 arithmetic: as the chunked kernel's
        chunked = loss_and_grad(memdec_loss, logits, labels, ids, probs, mask, beta=beta)[1]
        torch.testing.assert_close(g.float(), chunked.float(), rtol=0, atol=0)


def test_kl_alone_anchors_padding_on_the_first_support_id(scatter_order):
    logits, _, ids, probs, mask = shared_ids_batch()
    ids[0, 0, 2], ids[0, 0, 0] = ids[0, 0, 0].item(), 0  # row 0: the anchor itself has the padding's id
    kl, g = loss_and_grad(sparse_kl, logits, ids, probs, mask, kernel="rows")
    (_, ref, _), g_ref = loss_and_grad(lambda x: dense_reference(x, logits.argmax(-1), ids, probs, mask, 1.0), logits)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", ["chunked", "rows"])
def test_masks_that_are_not_one_bool_a_position_are_refused_by_either_kernel(kernel):
    """0/2 ints and 0/0.5 floats were read by the rows kernel as weights in the count and as 0/1 in the sums (a loss
    of 1.59 or 6.37 for 3.19), a transposed mask of the same count as rows; the chunked kernel refused them."""
    logits, labels, ids, probs, mask = make_batch(seed=13)
    assert B != T  # so that the transposed mask has another shape
    losses = {
        "memdec_loss": lambda m: memdec_loss(logits, labels, ids, probs, m, kernel=kernel),
        "sparse_kl": lambda m: sparse_kl(logits, ids, probs, m, kernel=kernel),
        "next_token_ce": lambda m: next_token_ce(logits, labels, m, kernel=kernel),
    }
    for loss in losses.values():
        for bad in (mask.long() * 2, mask.float() * 0.5):
            with pytest.raises(ValueError, match="mask must be bool"):
                loss(bad)
        with pytest.raises(ValueError, match=r"mask \(\d+, \d+\) must match logits"):
            loss(mask.T.contiguous())
        loss(mask)  # a bool mask of the positions' shape: accepted
    with pytest.raises(ValueError, match="mask must be bool"):
        row_loss_terms(logits, mask.float(), ids, probs, labels)


def graph_nodes(fn) -> set[str]:
    """The names of every autograd node reachable from ``fn``."""
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            todo += [n for n, _ in node.next_functions]
    return seen


def test_strided_rows_of_a_padded_vocabulary_are_read_in_place():
    """``logits[..., :V]`` of a decoder whose vocabulary is padded: no copy, the padding columns get no gradient."""
    logits, labels, ids, probs, mask = make_batch(seed=12)
    wide = torch.cat([logits, torch.randn(B, T, 27)], dim=-1).requires_grad_(True)
    view = row_view(wide[..., :V])
    assert view.data_ptr() == wide.data_ptr() and view.stride() == (V + 27, 1)
    out = memdec_loss(wide[..., :V], labels, ids, probs, mask, kernel="rows")
    out.loss.backward()
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, 0.5)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide.grad[..., :V], g_ref, rtol=1e-5, atol=1e-7)
    assert (wide.grad[..., V:] == 0).all()


@pytest.mark.parametrize("kernel", ["chunked", "rows"])
def test_vocab_size_reads_the_padded_logits_whole(kernel):
    """``vocab_size``: the padded logits given whole, the padding columns neither read nor given a gradient; with
    ``rows`` the gradient is written whole by the loss, with no slice (and its zero-filled copy) in the graph."""
    logits, labels, ids, probs, mask = make_batch(seed=16)
    wide = torch.cat([logits, torch.full((B, T, 27), float("nan"))], dim=-1).requires_grad_(True)
    out = memdec_loss(wide, labels, ids, probs, mask, kernel=kernel, vocab_size=V)
    out.loss.backward()
    ref, g_ref = loss_and_grad(dense_reference, logits, labels, ids, probs, mask, 0.5)
    torch.testing.assert_close(out.loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide.grad[..., :V], g_ref, rtol=1e-5, atol=1e-7)
    assert (wide.grad[..., V:] == 0).all()
    assert ("SliceBackward0" in graph_nodes(out.loss.grad_fn)) == (kernel == "chunked")
    for bad in (0, V + 28):
        with pytest.raises(ValueError, match="vocab_size"):
            memdec_loss(wide, labels, ids, probs, mask, kernel=kernel, vocab_size=bad)


def test_only_the_logits_are_kept_for_backward():
    logits, labels, ids, probs, mask = make_batch(seed=13, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = memdec_loss(x, labels, ids, probs, mask, kernel="rows")
    big = [t for t in saved if t.numel() >= B * T * V]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    out.loss.backward()


def test_rows_refuse_logits_without_a_row_view_and_unknown_kernels_are_named():
    logits, labels, ids, probs, mask = make_batch()
    shifted = torch.cat([logits, logits[:, :1]], dim=1)[:, :-1]  # a shift's slice: batch rows T + 1 apart
    with pytest.raises(ValueError, match="row view"):
        memdec_loss(shifted, labels, ids, probs, mask, kernel="rows")
    with pytest.raises(ValueError, match="chunked"):
        next_token_ce(logits, labels, mask, kernel="fused")
    with pytest.raises(ValueError, match="loss_kernel"):
        MemoryDecoderModule(config={"model_type": "gpt2"}, loss_kernel="fused")


def test_torch_row_ops_are_the_contract_the_triton_kernels_follow():
    """On the CPU ``row_ops`` gives the torch passes; a row whose coefficient is 0 gets 0 even if its logits are NaN
    (a filler window's), an all −inf row's logsumexp is −inf, and the columns past the rows' width (a padded
    vocabulary's) get 0 whatever ``out`` held."""
    assert row_ops(torch.device("cpu")) is TORCH_ROW_OPS
    rows = torch.randn(4, 50)
    rows[1] = float("nan")
    rows[2] = float("-inf")
    lse = TORCH_ROW_OPS.logsumexp(rows)
    assert lse[2] == float("-inf")
    torch.testing.assert_close(lse[[0, 3]], torch.logsumexp(rows[[0, 3]], 1))
    out = torch.full((4, 64), float("nan"), dtype=torch.bfloat16)  # what a reused allocation may hold
    coef = torch.tensor([0.5, 0.0, 0.0, 2.0])
    TORCH_ROW_OPS.scaled_softmax(rows, lse, coef, out)
    assert (out[1:3] == 0).all() and (out[:, 50:] == 0).all()
    torch.testing.assert_close(out[3, :50].float(), (2 * torch.softmax(rows[3], 0)).bfloat16().float())


def test_row_loss_terms_takes_the_passes_it_is_given():
    """The passes are a parameter: recording ones see every row, once forward and once backward."""
    logits, labels, ids, probs, mask = make_batch(seed=14)
    calls = []
    recording = TORCH_ROW_OPS._replace(
        logsumexp=lambda rows: calls.append(("lse", rows.shape)) or TORCH_ROW_OPS.logsumexp(rows),
        scaled_softmax=lambda *a: calls.append(("softmax", a[0].shape)) or TORCH_ROW_OPS.scaled_softmax(*a),
    )
    x = logits.clone().requires_grad_(True)
    kl, ce = row_loss_terms(x, mask, ids, probs, labels, recording)
    (kl + ce).backward()
    assert calls == [("lse", (B * T, V)), ("softmax", (B * T, V))]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_module_trains_with_either_kernel_to_the_same_loss():
    """MemoryDecoderModule(loss_kernel=...) on one batch, its vocabulary padded (37 → 40): the same loss and the same
    decoder gradients."""
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": V, "n_positions": T}
    logits, labels, ids, probs, mask = make_batch(seed=15)
    batch = {"input_ids": labels.roll(1, 1), "labels": labels, "target_ids": ids, "target_probs": probs}
    batch["loss_mask"] = mask
    grads = {}
    for kernel in ("chunked", "rows"):
        torch.manual_seed(1)
        module = MemoryDecoderModule(config=config, loss_kernel=kernel, pad_vocab_multiple=8)
        module.configure_model()
        module.decoder.eval()  # no dropout: both see the same forward
        loss = module.training_step(batch, 0)
        loss.backward()
        assert module.decoder.get_output_embeddings().weight.shape[0] == 40
        grads[kernel] = (loss.detach(), [p.grad.clone() for p in module.decoder.parameters()])
    torch.testing.assert_close(grads["rows"][0], grads["chunked"][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads["rows"][1], grads["chunked"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def three_steps(root, pair, *settings: str):
    """``memdec fit`` for three steps as a user runs it: dropout on, one seed, no validation."""
    args = [*TINY_DECODER, *data_args(pair), *settings, "--seed_everything", "0", "--trainer.accelerator", "cpu"]
    args += ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.limit_val_batches", "0", "--trainer.max_steps", "3", "--checkpoint.dirpath", str(root)]
    return lightning_cli(["fit", *args])


@pytest.mark.slow
def test_memdec_fit_with_either_loss_kernel_trains_the_same_decoder(tmp_path, biomed_targets_pair):
    """``memdec fit --model.loss_kernel rows`` as a user runs it (a padded vocabulary, dropout on, one seed): three
    steps end at the same weights as with the default kernel."""
    states = {}
    for kernel in ("chunked", "rows"):
        settings = ["--model.loss_kernel", kernel, "--model.pad_vocab_multiple", "64"]
        cli = three_steps(tmp_path / kernel, biomed_targets_pair, *settings)
        assert cli.model.hparams.loss_kernel == kernel and cli.trainer.global_step == 3
        states[kernel] = {k: v.clone() for k, v in cli.model.decoder.state_dict().items()}
    for name, want in states["chunked"].items():
        torch.testing.assert_close(states["rows"][name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_padded_vocabulary_trains_the_unpadded_run_with_dropout_on(tmp_path, biomed_targets_pair):
    """The padded rows' random init drew from the global stream, so every dropout mask after it differed: the same
    seed gave another run (val/ce 9.866944 vs 9.870936 after 52 steps, audit 9)."""
    states = {}
    for multiple in ("1", "64"):
        cli = three_steps(tmp_path / multiple, biomed_targets_pair, "--model.pad_vocab_multiple", multiple)
        vocab = cli.model.vocab_size
        states[multiple] = {k: v[:vocab].clone() if "wte" in k or "lm_head" in k else v.clone()
                            for k, v in cli.model.decoder.state_dict().items()}  # fmt: skip
    assert json.loads(TINY_DECODER[1]).get("resid_pdrop", 0.1) > 0
    for name, want in states["1"].items():
        torch.testing.assert_close(states["64"][name], want, rtol=1e-4, atol=1e-6, msg=name)
