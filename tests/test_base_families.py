"""Plug and play with bases of other families than the tests' GPT-2 and Llama (Gemma 2's hybrid cache, Falcon's
parallel block, a mixture of experts, a post-norm block): generate through the paired cache equals a loop that
recomputes the mixture's whole prefix at every step, and the mixture equals the log-mixture of the two models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.io.embedded import load_tokenizer

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
             vocab_size=50257, max_position_embeddings=128, pad_token_id=0, bos_token_id=50256,
             eos_token_id=50256)  # fmt: skip
FAMILIES = {
    "gemma2": {"head_dim": 16},
    "falcon": {"num_kv_heads": 2},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
    "olmo2": {},
}
LMBDA = 0.3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("decoder") / "memdec", seed=1)


def saved_base(path, model_type: str):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **FAMILIES[model_type])).save_pretrained(
        path
    )
    load_tokenizer("gpt2").save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_base_of_another_family_mixes_and_generates_like_the_uncached_mixture(tmp_path, decoder, model_type):
    base_dir = saved_base(tmp_path / model_type, model_type)
    mixed = InterpolatedLM.from_pretrained(str(base_dir), str(decoder), lmbda=LMBDA)
    prompt = torch.tensor([load_tokenizer("gpt2")("The patient was given a dose of")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    memdec = AutoModelForCausalLM.from_pretrained(decoder).eval()
    with torch.no_grad():
        expected = torch.logaddexp(
            math.log(1 - LMBDA) + base(prompt).logits.log_softmax(-1),
            math.log(LMBDA) + memdec(prompt).logits.log_softmax(-1),
        )
        got = mixed(prompt).logits.log_softmax(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    generated = mixed.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):  # no cache: the whole prefix through both models at every step
        with torch.no_grad():
            seq = torch.cat([seq, mixed(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == seq.tolist()
    beams = mixed.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, num_return_sequences=3)
    assert beams.shape == (3, prompt.shape[1] + 4)
