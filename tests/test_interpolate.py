"""InterpolatedLM: the mixture's numbers, generation through HF generate(), and vocabulary checks.

Tiny random models (2 layers, 32–64 dims) with the real GPT-2 vocabulary, saved and reloaded by path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_memdec.inference.interpolated_lm import InterpolatedLM, PairCache
from lightning_memdec.io.embedded import load_tokenizer
from lightning_memdec.io.tokenizer_identity import tokenizer_fingerprint

VOCAB = 50257
PROMPTS = ["The patient was given a dose of", "Law"]


def _gpt2(seed: int, n_embd: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # Untied head: with tied embeddings a random GPT-2 just repeats its input token, a weak test of generation.
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=2, n_head=2, n_positions=128, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def gpt2_tok():
    tok = load_tokenizer("gpt2")
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, gpt2_tok):
    """Model directories, each saved with save_pretrained (and a tokenizer where a real release would have one)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model, tok in [
        ("gpt2-base", _gpt2(0, 64), gpt2_tok),
        ("gpt2-memdec", _gpt2(1, 32), gpt2_tok),
        ("llama-memdec", _llama(2), gpt2_tok),
        ("gpt2-padded-base", _gpt2(3, 64, vocab=50304), None),  # head padded past the tokenizer, like Qwen's
        ("neox-memdec", _gpt2(4, 32, vocab=50277), load_tokenizer("gpt-neox-20b")),
    ]:
        path = root / name
        model.save_pretrained(path)
        if tok is not None:
            tok.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module", params=["gpt2-memdec", "llama-memdec"])
def mixed(request, dirs):
    """GPT-2 base + a same-architecture or a cross-architecture (Llama) decoder, all loaded by path."""
    return InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs[request.param], lmbda=0.3)


@pytest.fixture(scope="module")
def cross(dirs):
    """The cross-architecture pair alone, for the slower generation modes (two different cache layouts)."""
    return InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs["llama-memdec"], lmbda=0.3)


@pytest.fixture(scope="module")
def prompt_ids(gpt2_tok):
    return gpt2_tok([PROMPTS[0]], return_tensors="pt").input_ids


def _direct(lm: InterpolatedLM, ids, lmbda, attention_mask=None):
    """log((1-λ)·softmax(base) + λ·softmax(mem)), straight from the two models."""
    with torch.no_grad():
        pb = F.softmax(lm.base(ids, attention_mask=attention_mask).logits[..., :VOCAB].double(), -1)
        pm = F.softmax(lm.memdec(ids, attention_mask=attention_mask).logits[..., :VOCAB].double(), -1)
    return torch.log((1 - lmbda) * pb + lmbda * pm)


def _greedy_loop(lm: InterpolatedLM, ids, steps: int):
    for _ in range(steps):
        nxt = lm.log_probs(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


# -- the mixture ---------------------------------------------------------------------------------------------------


def test_loads_by_path_with_tokenizers_and_shared_vocab(mixed, gpt2_tok):
    assert isinstance(mixed.base, GPT2LMHeadModel)
    assert tokenizer_fingerprint(mixed.tokenizer) == tokenizer_fingerprint(gpt2_tok)
    assert mixed.config.vocab_size == VOCAB
    assert not mixed.training


def test_endpoints_are_exactly_the_single_models(mixed, prompt_ids):
    with torch.no_grad():
        base = F.log_softmax(mixed.base(prompt_ids).logits.float(), -1)
        mem = F.log_softmax(mixed.memdec(prompt_ids).logits.float(), -1)
    mixed.lmbda = 0.0
    assert torch.equal(mixed.log_probs(prompt_ids), base)
    mixed.lmbda = 1.0
    assert torch.equal(mixed.log_probs(prompt_ids), mem)
    mixed.lmbda = 0.3


def test_mixture_matches_direct_formula_and_normalises(mixed, prompt_ids):
    lp = mixed.log_probs(prompt_ids)
    assert lp.shape == (1, prompt_ids.shape[1], VOCAB) and lp.dtype == torch.float32
    ones = torch.ones(lp.shape[:2], dtype=torch.float64)
    torch.testing.assert_close(lp.double().exp().sum(-1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp.double(), _direct(mixed, prompt_ids, 0.3), atol=1e-5, rtol=1e-5)
    # the logits are already log-probabilities: log_softmax leaves them alone, so generate() can use them as is
    torch.testing.assert_close(F.log_softmax(lp, -1), lp, atol=1e-5, rtol=0)


def test_labels_give_the_mixture_nll(cross, prompt_ids):
    out = cross(prompt_ids, labels=prompt_ids)
    lp = _direct(cross, prompt_ids, 0.3)[0, :-1]
    expected = -lp.gather(-1, prompt_ids[0, 1:, None]).mean()
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)


def test_return_dict_false_gives_a_tuple_as_a_hugging_face_model_does(cross, prompt_ids):
    """``return_dict=False`` was accepted and ignored: a caller unpacking ``loss, logits = model(...)`` as with any
    Hugging Face model got the output object. Now its fields as a tuple, equal to the object's."""
    whole = cross(prompt_ids, labels=prompt_ids)
    loss, logits = cross(prompt_ids, labels=prompt_ids, return_dict=False)
    torch.testing.assert_close(loss, whole.loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, whole.logits, rtol=0, atol=0)
    (alone,) = cross(prompt_ids, return_dict=False)  # no labels, no cache: the logits alone
    torch.testing.assert_close(alone, whole.logits, rtol=0, atol=0)


def test_lmbda_is_validated(dirs, prompt_ids):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
            InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs["gpt2-memdec"], lmbda=bad)
    lm = InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs["gpt2-memdec"], lmbda=0.25)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\]"):
        lm.lmbda = 2
    for bad in (True, "0.3"):  # read as 1.0 and 0.3, they hid a caller's mistake
        with pytest.raises(ValueError, match=r"lmbda must be a number in \[0, 1\]"):
            lm.lmbda = bad
    assert lm.lmbda == 0.25
    before = lm.log_probs(prompt_ids)
    lm.lmbda = 0.75
    assert lm.config.lmbda == 0.75
    torch.testing.assert_close(lm.log_probs(prompt_ids).double(), _direct(lm, prompt_ids, 0.75), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, lm.log_probs(prompt_ids))


# -- padding and generation ----------------------------------------------------------------------------------------


def test_left_padding_leaves_real_positions_unchanged(mixed, gpt2_tok):
    batch = gpt2_tok(PROMPTS, return_tensors="pt", padding=True)
    lp = mixed.log_probs(batch.input_ids, batch.attention_mask)
    for row, prompt in enumerate(PROMPTS):
        alone = mixed.log_probs(gpt2_tok([prompt], return_tensors="pt").input_ids)[0]
        torch.testing.assert_close(lp[row, -alone.shape[0] :], alone, atol=1e-4, rtol=1e-4)


def test_greedy_generate_equals_argmax_loop(mixed, prompt_ids):
    out = mixed.generate(prompt_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out.shape == (1, prompt_ids.shape[1] + 12)
    assert torch.equal(out, _greedy_loop(mixed, prompt_ids, 12))
    assert len(set(out[0, prompt_ids.shape[1] :].tolist())) > 1  # a non-degenerate continuation


def test_left_padded_batch_matches_each_prompt_alone(mixed, gpt2_tok):
    batch = gpt2_tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # really left-padded
    out = mixed.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=None)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(PROMPTS):
        single = gpt2_tok([prompt], return_tensors="pt")
        alone = mixed.generate(**single, max_new_tokens=10, do_sample=False, eos_token_id=None)
        n = alone.shape[1] - 10
        assert torch.equal(out[row, width:], alone[0, n:])


def test_sampling_is_seeded_and_top_k_1_is_greedy(cross, prompt_ids):
    greedy = cross.generate(prompt_ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    top1 = cross.generate(prompt_ids, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(top1, greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(
            cross.generate(
                prompt_ids, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, eos_token_id=None
            )
        )
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, prompt_ids.shape[1] + 10)


def test_beam_search_scores_match_recomputed_mixture(cross, prompt_ids):
    out = cross.generate(
        prompt_ids,
        max_new_tokens=8,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        eos_token_id=None,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (3, prompt_ids.shape[1] + 8)
    assert torch.all(out.sequences_scores[:-1] >= out.sequences_scores[1:])
    n = prompt_ids.shape[1]
    # recomputed without a cache: only right if beam search reordered *both* models' caches consistently
    lp = cross.log_probs(out.sequences)
    totals = lp[:, n - 1 : -1].gather(-1, out.sequences[:, n:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, totals, atol=1e-3, rtol=1e-4)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3


def test_eos_stops_generation(cross, prompt_ids, gpt2_tok):
    free = cross.generate(prompt_ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, prompt_ids.shape[1] :]
    eos = int(free[3])
    k = free.tolist().index(eos)  # first time it is produced
    out = cross.generate(
        prompt_ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=gpt2_tok.pad_token_id
    )
    assert out.shape[1] == prompt_ids.shape[1] + k + 1 and int(out[0, -1]) == eos


def test_default_generation_length_stops_at_the_shorter_context(cross):
    """Without max_new_tokens, generate() makes its default 20 new tokens capped at the context, as each model alone
    does: the mixture ran past its 128 positions (an IndexError in GPT-2's embedding; Llama decoded on, unbounded)."""
    prompt = torch.randint(0, 50000, (1, 119))
    alone = cross.base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
    mixed = cross.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
    assert cross.config.max_position_embeddings == 128
    assert mixed.shape[1] == alone.shape[1] == 128  # the guard: 119 + 20 would pass the context


def test_a_prompt_and_new_tokens_beyond_the_context_are_refused_up_front(cross):
    """One prompt of 120 tokens + 10 new ones pass the 128 positions: refused before any forward pass (the length
    counted is the prompt's, not the batch's 1), not an IndexError deep in GPT-2's position embedding."""
    prompt = torch.randint(0, 50000, (1, 120), generator=torch.Generator().manual_seed(0))
    forwards = []
    hooks = [m.register_forward_hook(lambda *_: forwards.append(1)) for m in (cross.base, cross.memdec)]
    try:
        with pytest.raises(ValueError, match="prompt \\+ max_new_tokens = 130 exceeds the context"):
            cross.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert forwards == []


@pytest.mark.parametrize(("ids", "message"), [(torch.zeros(1, 0, dtype=torch.long), "time ≥ 1"),
                                              (torch.tensor([1, 2]), "batch dimension"),
                                              (torch.tensor([[1, 50300]]), "50300, not a token id")])  # fmt: skip
def test_generate_refuses_ids_that_are_no_prompt_up_front(cross, ids, message):
    """An empty or 1-D prompt or an id past the vocabulary failed deep in transformers (RuntimeError, IndexError)."""
    with pytest.raises(ValueError, match=message):
        cross.generate(ids, max_new_tokens=2)


def test_generate_returns_pair_cache(cross, prompt_ids):
    out = cross.generate(prompt_ids, max_new_tokens=3, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    assert isinstance(out.cache, PairCache)
    assert out.cache.base.get_seq_length() == out.cache.memdec.get_seq_length() == prompt_ids.shape[1] + 2


# -- vocabularies --------------------------------------------------------------------------------------------------


def test_padded_vocab_base_mixes_over_tokenizer_ids(dirs, gpt2_tok, prompt_ids):
    with pytest.warns(UserWarning, match="cannot be checked"):  # the padded base dir has no tokenizer of its own
        lm = InterpolatedLM.from_pretrained(dirs["gpt2-padded-base"], dirs["gpt2-memdec"], lmbda=0.3)
    assert lm.base.config.vocab_size == 50304 and lm.config.vocab_size == VOCAB
    lm = InterpolatedLM.from_pretrained(dirs["gpt2-padded-base"], dirs["gpt2-memdec"], lmbda=0.3, tokenizer=gpt2_tok)
    lp = lm.log_probs(prompt_ids)
    assert lp.shape[-1] == VOCAB
    torch.testing.assert_close(lp.double(), _direct(lm, prompt_ids, 0.3), atol=1e-5, rtol=1e-5)
    out = lm.generate(prompt_ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(out, _greedy_loop(lm, prompt_ids, 10))


def test_tokenizer_mismatch_is_refused(dirs, gpt2_tok):
    neox = load_tokenizer("gpt-neox-20b")
    base = AutoModelForCausalLM.from_pretrained(dirs["gpt2-base"])
    mem = AutoModelForCausalLM.from_pretrained(dirs["neox-memdec"])
    pattern = (
        r"base model uses tokenizer gpt2 \(vocab 50257, fp 163dcf7c…\), "
        r"but the Memory Decoder uses gpt-neox-20b \(vocab 50277, fp aca9f498…\)"
    )
    with pytest.raises(ValueError, match=pattern):
        InterpolatedLM(base, mem, 0.3, base_tokenizer=gpt2_tok, memdec_tokenizer=neox)
    # same refusal when the tokenizers come from the model directories
    with pytest.raises(
        ValueError,
        match=r"base model uses tokenizer gpt2-base \(vocab 50257.*Memory Decoder uses neox-memdec \(vocab 50277",
    ):
        InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs["neox-memdec"], lmbda=0.3)
    # a shared tokenizer= is checked against the ones in the model directories, not trusted
    with pytest.raises(
        ValueError, match=r"tokenizer= uses tokenizer gpt-neox-20b \(vocab 50277.*each model uses gpt2-base"
    ):
        InterpolatedLM.from_pretrained(dirs["gpt2-base"], dirs["gpt2-memdec"], lmbda=0.3, tokenizer=neox)


def test_unverifiable_vocab_size_mismatch_is_refused(dirs, gpt2_tok):
    base = AutoModelForCausalLM.from_pretrained(dirs["gpt2-padded-base"])
    mem = _gpt2(5, 32)  # in memory: no directory, no tokenizer
    with pytest.raises(ValueError, match="50304 output ids and the decoder 50257"):
        InterpolatedLM(base, mem, 0.5)
    small = _gpt2(6, 32, vocab=50000)
    with pytest.raises(ValueError, match="decoder model's LM head has 50000 rows but the tokenizer has 50257"):
        InterpolatedLM(base, small, 0.5, tokenizer=gpt2_tok)


def test_module_does_not_import_lightning():
    """Plug-and-play inference must work without the training stack installed."""
    import ast

    import lightning_memdec.inference.interpolated_lm as mod

    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not roots & {"lightning", "pytorch_lightning"}
