"""Decoders saved in the official repository's layouts load offline and mix with a base of the same tokenizer:
GPT-2 as ``pytorch_model.bin`` (read with ``weights_only``: a pickle that runs code is refused, not run), a Qwen2 body
with a head padded past the tokenizer, a Qwen2 body with a Llama-3-style tokenizer (BOS added to every text)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lightning_memdec.hf.loading import find_tokenizer, load_causal_lm, output_rows
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.io.artifact_dirs import ArtifactError
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import tokenizer_fingerprint

LMBDA = 0.3
TEXT = ["the memory decoder is a small transformer", "it imitates a kNN-LM over the domain's datastore"]


def tiny_qwen2(vocab: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B, the official decoders' body
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(vocab: int = 50257) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128)).eval()


def llama3_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose post-processor puts <|begin_of_text|> before every text, as Llama-3's does."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT * 20, trainer)
    bos = bpe.token_to_id(specials[0])
    bpe.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1])


def expected_mixture(base, memdec, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """log((1-λ) p_base + λ p_mem) over the tokenizer's ids, from the two models' logits directly."""
    with torch.no_grad():
        p_base = torch.log_softmax(base(ids).logits[..., :vocab].float(), -1)
        p_mem = torch.log_softmax(memdec(ids).logits[..., :vocab].float(), -1)
    return torch.logaddexp(p_base + math.log(1 - LMBDA), p_mem + math.log(LMBDA))


def test_gpt2_decoder_as_pytorch_model_bin_loads(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the official checkpoints' format
    load_tokenizer("gpt2").save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    loaded = load_causal_lm(tmp_path).eval()
    ids = torch.tensor(find_tokenizer(str(tmp_path))(TEXT[0])["input_ids"])[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


class RunsCode:
    """Pickles as a call of os.system: what a malicious pytorch_model.bin holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_bin_that_would_run_code_is_refused_without_running_it(tmp_path):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    state = dict(model.state_dict())
    state["transformer.wte.weight"] = RunsCode(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        load_causal_lm(tmp_path)
    assert not marker.exists(), "loading a .bin executed code from the pickle"


def test_qwen2_decoder_with_a_padded_head_mixes_over_the_tokenizer_ids(tmp_path):
    torch.manual_seed(0)
    tokenizer = load_tokenizer("gpt2")
    memdec, base = tiny_qwen2(vocab=50304), tiny_gpt2()  # 47 head rows past the tokenizer's 50,257 ids
    for model, name in ((memdec, "memdec"), (base, "base")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    assert output_rows(load_causal_lm(tmp_path / "memdec")) == 50304
    mixed = InterpolatedLM(str(tmp_path / "base"), str(tmp_path / "memdec"), LMBDA)
    ids = torch.tensor(tokenizer(TEXT[1])["input_ids"])[None]
    with torch.no_grad():
        got = mixed(ids).logits
    assert got.shape[-1] == len(tokenizer)
    torch.testing.assert_close(got, expected_mixture(base, memdec, ids, len(tokenizer)))
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(got.shape[:-1]))


def test_qwen2_body_with_a_llama3_style_tokenizer(tmp_path):
    torch.manual_seed(0)
    tokenizer = llama3_style_tokenizer()
    vocab = len(tokenizer)
    memdec = tiny_qwen2(vocab)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base = LlamaForCausalLM(config).eval()
    for model, name in ((memdec, "memdec"), (base, "base")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    found = find_tokenizer(str(tmp_path / "memdec"))
    assert tokenizer_fingerprint(found) == tokenizer_fingerprint(tokenizer) and len(found) == vocab
    assert len(load_tokenizer(str(tmp_path / "memdec"))) == vocab  # what `memdec tokenize --tokenizer DIR` uses
    ids = found(TEXT[0])["input_ids"]
    assert ids[0] == found.bos_token_id and found.convert_ids_to_tokens(ids[0]) == "<|begin_of_text|>"
    mixed = InterpolatedLM(str(tmp_path / "base"), str(tmp_path / "memdec"), LMBDA)
    ids = torch.tensor(ids)[None]
    with torch.no_grad():
        torch.testing.assert_close(mixed(ids).logits, expected_mixture(base, memdec, ids, vocab))


def test_llama3_style_decoder_is_refused_beside_a_gpt2_base(tmp_path):
    tokenizer = llama3_style_tokenizer()
    tiny_qwen2(len(tokenizer)).save_pretrained(tmp_path / "memdec")
    tokenizer.save_pretrained(tmp_path / "memdec")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    load_tokenizer("gpt2").save_pretrained(tmp_path / "base")
    with pytest.raises(ArtifactError, match="tokenizer"):
        InterpolatedLM(str(tmp_path / "base"), str(tmp_path / "memdec"), LMBDA)
