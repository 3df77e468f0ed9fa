"""StaticGenerator.from_knnlm: kNN-LM decoding on static caches gives KNNLM's own tokens (greedy, sampled,
left-padded), its exact search inside the captured step (on the CPU: CapturedStep's static tensors; the CUDA graph
itself runs only on a GPU, in benchmarks/gpu.py), the base's forward traced whole with the key hook in it."""

from __future__ import annotations

import pytest
import torch
from host_work import host_work_of_step
from transformers import GenerationConfig

from lightning_memdec.inference.captured_step import CapturedStep
from lightning_memdec.inference.decoding_settings import next_token, sampling_warpers
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.static_generation import StaticGenerator

PROMPTS = [[464, 3290, 373, 257, 1310], [40, 588, 257, 1310, 286]]


@pytest.fixture(scope="module")
def exact_knnlm(tiny_gpt2, biomed_datastore):
    return KNNLM(tiny_gpt2, biomed_datastore, k=16, temperature=4.0, lmbda=0.5, search="exact")


@pytest.fixture(scope="module")
def faiss_knnlm(tiny_gpt2, biomed_datastore, biomed_index):
    return KNNLM(tiny_gpt2, biomed_datastore, biomed_index, k=16, temperature=4.0, lmbda=0.5)


def base_alone_tokens(knnlm: KNNLM, prompt: torch.Tensor, new: int) -> torch.Tensor:
    return StaticGenerator(knnlm.base, max_length=64, vocab_size=knnlm.vocab).generate(prompt, new)


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS])
def test_greedy_tokens_equal_knnlms_own_loop(exact_knnlm, rows):
    prompt = torch.tensor(rows)
    gen = StaticGenerator.from_knnlm(exact_knnlm, max_length=64)
    assert isinstance(gen._compiled_step, CapturedStep)  # exact search over resident keys: the step is captured
    got = gen.generate(prompt, 10)
    assert torch.equal(got, exact_knnlm.generate_greedy(prompt, 10))
    assert torch.equal(gen.generate(prompt, 10), got)  # caches and the captured step reused: the same tokens
    assert not torch.equal(got, base_alone_tokens(exact_knnlm, prompt, 10))  # p_kNN really changes the tokens


def test_a_faiss_search_runs_uncaptured_after_the_base(faiss_knnlm):
    prompt = torch.tensor(PROMPTS)
    gen = StaticGenerator.from_knnlm(faiss_knnlm, max_length=64)
    assert not isinstance(gen._compiled_step, CapturedStep)  # a host search cannot be part of a CUDA graph
    assert torch.equal(gen.generate(prompt, 8), faiss_knnlm.generate_greedy(prompt, 8))


def test_keys_too_large_to_be_resident_are_streamed_uncaptured(tiny_gpt2, biomed_datastore, monkeypatch):
    """Keys that do not fit the device are streamed from the host each search: no graph can hold that."""
    import lightning_memdec.retrieval.exact_search as exact_search

    monkeypatch.setattr(exact_search, "resident_keys", lambda keys, device: None)
    knnlm = KNNLM(tiny_gpt2, biomed_datastore, k=16, temperature=4.0, lmbda=0.5, search="exact")
    gen = StaticGenerator.from_knnlm(knnlm, max_length=64)
    assert not isinstance(gen._compiled_step, CapturedStep) and knnlm.device_keys is None
    prompt = torch.tensor(PROMPTS[:1])
    assert torch.equal(gen.generate(prompt, 6), knnlm.generate_greedy(prompt, 6))


def test_the_base_forward_traces_whole_with_the_key_hook(exact_knnlm):
    """Compiled (dynamo, fullgraph: a graph break raises), the forward still hands the hooked key to the search."""
    prompt = torch.tensor(PROMPTS)
    compiled = StaticGenerator.from_knnlm(exact_knnlm, max_length=64, compile=True, backend="eager")
    assert torch.equal(compiled.generate(prompt, 8), exact_knnlm.generate_greedy(prompt, 8))


def test_left_padded_prompts_equal_each_prompt_alone(exact_knnlm):
    uneven = [[0, 0, 464, 3290, 373], [40, 588, 257, 1310, 286]]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = StaticGenerator.from_knnlm(exact_knnlm, max_length=64).generate(
        torch.tensor(uneven), 6, attention_mask=mask, eos_token_id=None
    )
    for row, (ids, keep) in enumerate(zip(uneven, mask.bool())):
        alone = torch.tensor([ids])[:, keep]
        assert torch.equal(got[row, -6:], exact_knnlm.generate_greedy(alone, 6)[0, -6:])


def test_sampled_tokens_equal_a_loop_over_knnlms_mixture(exact_knnlm):
    """The same draws, under one seed, as sampling each step from KNNLM.log_probs of the whole sequence."""
    prompt, settings = torch.tensor(PROMPTS), {"temperature": 0.8, "top_k": 20}
    warpers = sampling_warpers(GenerationConfig(do_sample=True, top_p=1.0, **settings))
    torch.manual_seed(5)
    want = prompt
    for _ in range(8):
        want = torch.cat([want, next_token(want, exact_knnlm.log_probs(want)[:, -1], warpers)[:, None]], 1)
    torch.manual_seed(5)
    gen = StaticGenerator.from_knnlm(exact_knnlm, max_length=64)
    assert torch.equal(gen.generate(prompt, 8, do_sample=True, top_p=1.0, **settings), want)


def test_an_uneven_lambda_weighs_p_knn_by_lambda_as_knnlm_does(tiny_gpt2, biomed_datastore):
    """log p = logaddexp(log(1−λ) + log p_base, log λ + log p_kNN): at λ = 0.2 (where swapping the two terms changes
    the mixture, unlike at 0.5) the greedy tokens are KNNLM's own loop's and sampled ones, under one seed, those of
    sampling each step from KNNLM.log_probs of the whole sequence."""
    knnlm = KNNLM(tiny_gpt2, biomed_datastore, k=16, temperature=4.0, lmbda=0.2, search="exact")
    prompt, settings = torch.tensor(PROMPTS), {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    gen = StaticGenerator.from_knnlm(knnlm, max_length=64)
    assert torch.equal(gen.generate(prompt, 8), knnlm.generate_greedy(prompt, 8))
    warpers = sampling_warpers(GenerationConfig(do_sample=True, **settings))
    torch.manual_seed(9)
    want = prompt
    for _ in range(8):
        want = torch.cat([want, next_token(want, knnlm.log_probs(want)[:, -1], warpers)[:, None]], 1)
    torch.manual_seed(9)
    assert torch.equal(gen.generate(prompt, 8, do_sample=True, **settings), want)


def test_refusals(exact_knnlm, tiny_gpt2):
    gen = StaticGenerator.from_knnlm(exact_knnlm, max_length=64)
    with pytest.raises(ValueError, match="not by beam search"):
        gen.generate(torch.tensor(PROMPTS), 4, num_beams=2)
    with pytest.raises(ValueError, match="its own base"):
        StaticGenerator(exact_knnlm.base, exact_knnlm.base, 0.5, retrieval=exact_knnlm)
    with pytest.raises(TypeError, match="from_knnlm takes a KNNLM, got InterpolatedLM.*from_interpolated"):
        StaticGenerator.from_knnlm(InterpolatedLM(exact_knnlm.base, exact_knnlm.base, 0.5))
    with pytest.raises(ValueError, match="a kNN-LM has none: leave overlap off"):
        StaticGenerator.from_knnlm(exact_knnlm, overlap=True)


def test_the_captured_step_holds_no_host_work(exact_knnlm):
    """The step StaticGenerator captures (base forward, exact search, p_kNN, mixture), run as the capture runs it:
    nothing made from host data, nothing read back."""
    assert host_work_of_step(StaticGenerator.from_knnlm(exact_knnlm, max_length=64), torch.tensor(PROMPTS)) == []
