"""StaticGenerator: static caches and a compiled step give generate()'s tokens (greedy and sampled)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny

from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.static_generation import StaticGenerator

PROMPTS = [[464, 3290, 373, 257, 1310], [40, 588, 257, 1310, 286]]  # two rows of one length


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tiny_gpt2):
    memdec = save_tiny(tmp_path_factory.mktemp("static") / "memdec", seed=5)
    return InterpolatedLM(str(tiny_gpt2), str(memdec), 0.4)


def hf_tokens(model, prompt: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS])
def test_greedy_tokens_equal_generate(mixture, rows):
    prompt = torch.tensor(rows)
    want = hf_tokens(mixture, prompt, 12, do_sample=False)
    got = StaticGenerator.from_interpolated(mixture, max_length=64).generate(prompt, 12)
    assert torch.equal(got, want)
    base_alone = StaticGenerator(mixture.base, max_length=64).generate(prompt, 12)
    assert torch.equal(base_alone, hf_tokens(mixture.base, prompt, 12, do_sample=False))
    assert not torch.equal(base_alone, got)  # the decoder changes the tokens: the mixture is really applied


def test_sampled_tokens_equal_generate_under_one_seed(mixture):
    prompt = torch.tensor(PROMPTS)
    settings = {"temperature": 0.7, "top_k": 40, "top_p": 0.9}
    torch.manual_seed(11)
    want = hf_tokens(mixture, prompt, 10, do_sample=True, **settings)
    torch.manual_seed(11)
    got = StaticGenerator.from_interpolated(mixture, max_length=64).generate(prompt, 10, do_sample=True, **settings)
    assert torch.equal(got, want)


def test_the_step_compiles_into_one_graph_and_gives_the_same_tokens(mixture):
    """fullgraph=True fails on any graph break: what CUDA-graph replay (mode="reduce-overhead") needs. The eager
    backend traces with dynamo without generating code, so this runs in seconds on CPU."""
    torch._dynamo.reset()
    prompt = torch.tensor(PROMPTS[:1])
    compiled = StaticGenerator.from_interpolated(mixture, max_length=64, compile=True, backend="eager")
    first = compiled.generate(prompt, 8)
    assert torch.equal(first, hf_tokens(mixture, prompt, 8, do_sample=False))
    assert torch.equal(compiled.generate(prompt, 8), first)  # caches reset between calls, nothing carried over


def test_rows_that_reach_eos_are_padded_and_decoding_stops(mixture):
    prompt = torch.tensor(PROMPTS)
    free = StaticGenerator.from_interpolated(mixture, max_length=64).generate(prompt, 12)
    eos = int(free[0, len(PROMPTS[0]) + 2])  # row 0's third new token
    want = mixture.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=7)
    got = StaticGenerator.from_interpolated(mixture, max_length=64).generate(prompt, 12, eos_token_id=eos,
                                                                               pad_token_id=7)  # fmt: skip
    assert torch.equal(got, want)


def test_requests_it_cannot_serve_are_refused(mixture, tiny_gpt2):
    gen = StaticGenerator.from_interpolated(mixture, max_length=16)
    with pytest.raises(ValueError, match="exceeds the static caches' 16 positions"):
        gen.generate(torch.tensor(PROMPTS[:1]), 12)
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        gen.generate(torch.tensor(PROMPTS[:1]), 0)
    with pytest.raises(ValueError, match="pass pad_token_id with eos_token_id"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, eos_token_id=5)
    with pytest.raises(ValueError, match="exceeds the context of"):
        StaticGenerator(load_causal_lm(tiny_gpt2), max_length=600).generate(torch.tensor(PROMPTS[:1]), 590)
    router_lm = InterpolatedLM(mixture.base, mixture.memdec, 0.4)
    router_lm.router = object()  # any router: skips are data-dependent
    with pytest.raises(ValueError, match="fixed λ"):
        StaticGenerator.from_interpolated(router_lm)
