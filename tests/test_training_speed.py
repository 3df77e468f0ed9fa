"""The training speed options (padded vocabulary, fused AdamW, torch.compile) leave the loss and its gradients
those of the plain module, and the loss reads a padded decoder's logits in place."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_memdec.kernels.memdec_loss import memdec_loss
from lightning_memdec.training.lightning_module import MemoryDecoderModule

CONFIG = {"model_type": "gpt2", "vocab_size": 1000, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip


def batch(seed=0, b=2, t=16, m=5, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(b, t, m, generator=g)
    probs[..., -1] = 0  # a padding entry
    ids = torch.stack([torch.randperm(vocab, generator=g)[:m] for _ in range(b * t)]).view(b, t, m)
    return {
        "input_ids": torch.randint(0, vocab, (b, t), generator=g),
        "labels": torch.randint(0, vocab, (b, t), generator=g),
        "target_ids": ids.int(),
        "target_probs": (probs / probs.sum(-1, keepdim=True)).half(),
        "loss_mask": torch.rand(b, t, generator=g) > 0.2,
    }


def module(**options):
    torch.manual_seed(0)
    out = MemoryDecoderModule(config=CONFIG, **options)
    out.configure_model()
    return out


def loss_and_grads(mod, data):
    mod.zero_grad(set_to_none=True)
    out = mod._loss(data)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in mod.decoder.named_parameters()}


@pytest.mark.parametrize("dtype, full_mask", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False)])
def test_loss_reads_the_unpadded_columns_in_place(dtype, full_mask):
    """Padding columns hold NaN: a loss that read them (or copied the whole tensor) would differ or be NaN."""
    data = batch()
    mask = torch.ones_like(data["loss_mask"]) if full_mask else data["loss_mask"]
    full = torch.randn(2, 16, 1024, dtype=dtype)
    full[..., 1000:] = float("nan")
    padded = full.requires_grad_()
    clean = full.detach()[..., :1000].clone().requires_grad_()
    args = (data["labels"], data["target_ids"], data["target_probs"], mask)
    got, want = memdec_loss(padded[..., :1000], *args), memdec_loss(clean, *args)
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)), rtol=0, atol=0)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(padded.grad[..., :1000], clean.grad, rtol=0, atol=0)
    assert padded.grad[..., 1000:].eq(0).all()


def test_padded_vocabulary_keeps_loss_gradients_and_the_exported_model():
    plain, padded = module(), module(pad_vocab_multiple=64)
    assert padded.decoder.get_output_embeddings().weight.shape[0] == 1024 and padded.vocab_size == 1000
    with torch.no_grad():  # the same weights: the padded module's first 1000 rows are the plain module's
        padded.decoder.get_input_embeddings().weight[:1000] = plain.decoder.get_input_embeddings().weight
    data = batch()
    (got, got_grads), (want, want_grads) = loss_and_grads(padded, data), loss_and_grads(plain, data)
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)), rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name][: grad.shape[0]], grad, rtol=1e-5, atol=1e-7)
    assert got_grads["transformer.wte.weight"][1000:].eq(0).all()  # padding ids are never a target
    state = padded.unpadded(padded.decoder.state_dict())
    assert state["transformer.wte.weight"].shape == (1000, 32) and state["transformer.h.0.attn.c_attn.weight"].ndim
    with pytest.raises(ValueError, match="pad_vocab_multiple must be"):
        MemoryDecoderModule(config=CONFIG, pad_vocab_multiple=0)


def test_export_of_a_padded_decoder_is_the_tokenizers_vocabulary(tmp_path):
    """What ExportHF does: the cut state dict under the unpadded vocabulary loads and gives the module's logits."""
    padded = module(pad_vocab_multiple=64)
    config = padded.decoder.config
    config.vocab_size = padded.vocab_size
    padded.decoder.save_pretrained(tmp_path, state_dict=padded.unpadded(padded.decoder.state_dict()))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batch()["input_ids"]
    assert exported.config.vocab_size == 1000
    torch.testing.assert_close(exported(ids).logits, padded.eval()(ids))


def test_fused_adamw_on_request_and_the_same_steps():
    stub = SimpleNamespace(estimated_stepping_batches=10, datamodule=None)
    optimizers = {}
    for fused in (None, True):
        mod = module(fused_adamw=fused)
        mod._trainer = stub
        optimizers[fused] = (mod, mod.configure_optimizers()["optimizer"])
    assert optimizers[None][1].defaults["fused"] is False  # default: fused only with the decoder on a GPU
    assert optimizers[True][1].defaults["fused"] is True
    data = batch()
    for _ in range(3):
        for mod, opt in optimizers.values():
            loss_and_grads(mod, data)
            opt.step()
    (plain, _), (fused, _) = optimizers[None], optimizers[True]
    for (name, a), b in zip(plain.decoder.named_parameters(), fused.decoder.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_decoder_gives_the_eager_loss_and_gradients():
    eager, compiled = module(), module(compile=True)
    data = batch()
    (got, got_grads), (want, want_grads) = loss_and_grads(compiled, data), loss_and_grads(eager, data)
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)), rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(compiled.decoder.state_dict()) == set(eager.decoder.state_dict())  # checkpoints unchanged
