"""OverlappedStep and StaticGenerator(overlap=True) on the CPU: the static tensors a captured graph reads, and the
tokens of generate() (greedy, sampled, left-padded, each forward traced whole as a capture needs). The CUDA streams
and the graph itself run only on a GPU (benchmarks/gpu.py)."""

from __future__ import annotations

import pytest
import torch
from host_work import host_work_of_step
from test_static_generation import EOS, PROMPTS, UNEVEN, hf_tokens, padded

from lightning_memdec.inference.overlapped_step import OverlappedStep
from lightning_memdec.inference.static_generation import StaticGenerator


def test_each_shape_gets_static_inputs_that_later_calls_fill():
    seen = []

    def first(ids, positions, mask):
        seen.append(ids.data_ptr())
        return ids.float() + positions.float()

    def second(ids, positions, mask):
        return ids.float() * (1 if mask is None else mask[:, :1].float())

    step = OverlappedStep(first, second, torch.add, "cpu")
    one = step(torch.tensor([[3]]), torch.tensor([5]), None)
    assert one.tolist() == [[3 + 5 + 3]]
    out = step(torch.tensor([[4]]), torch.tensor([6]), None)
    assert out is one and out.tolist() == [[4 + 6 + 4]]  # the same output tensor, overwritten: a graph's output
    assert len(set(seen)) == 1  # every call read the one static ids tensor, as a replayed graph does
    masked = step(torch.tensor([[2], [7]]), torch.tensor([1]), torch.tensor([[0, 1], [1, 1]]))
    assert masked.tolist() == [[2 + 1 + 0], [7 + 1 + 7]] and len(step.graphs) == 2  # a new shape, its own tensors


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tiny_gpt2):
    from conftest import save_tiny

    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    memdec = save_tiny(tmp_path_factory.mktemp("overlap") / "memdec", seed=5)
    return InterpolatedLM(str(tiny_gpt2), str(memdec), 0.4)


@pytest.mark.parametrize("compile", [False, True])
def test_overlapped_greedy_and_sampled_tokens_equal_generate(mixture, compile):
    """compile=True with dynamo's eager backend traces each model's forward with fullgraph=True: no graph break, no
    host sync inside a forward, which a CUDA-graph capture of the two would not survive."""
    torch._dynamo.reset()
    prompt = torch.tensor(PROMPTS)
    options = {"compile": True, "backend": "eager"} if compile else {}
    gen = StaticGenerator.from_interpolated(mixture, max_length=64, overlap=True, **options)
    assert torch.equal(gen.generate(prompt, 12), hf_tokens(mixture, prompt, 12, do_sample=False))
    settings = {"temperature": 0.7, "top_k": 40, "top_p": 0.9}
    torch.manual_seed(11)
    want = hf_tokens(mixture, prompt, 10, do_sample=True, **settings)
    torch.manual_seed(11)
    assert torch.equal(gen.generate(prompt, 10, do_sample=True, **settings), want)


def test_the_captured_step_holds_no_host_work(mixture):
    """Both forwards and the mixture, run as the capture runs them: nothing made from host data, nothing read back."""
    assert (
        host_work_of_step(
            StaticGenerator.from_interpolated(mixture, max_length=64, overlap=True), torch.tensor(PROMPTS)
        )
        == []
    )


def test_new_caches_drop_the_graphs_that_wrote_the_old_ones(mixture, monkeypatch):
    """A captured graph writes the caches it was captured with: caches made for another batch size replace them,
    so the step forgets its graphs then (on a GPU one would otherwise write the stale caches)."""
    forgotten = []
    forget = OverlappedStep.forget
    monkeypatch.setattr(OverlappedStep, "forget", lambda step: (forgotten.append(len(step.graphs)), forget(step)))
    gen = StaticGenerator.from_interpolated(mixture, max_length=64, overlap=True)
    two, one = torch.tensor(PROMPTS), torch.tensor(PROMPTS[:1])
    for prompt in (two, two, one, two):
        assert torch.equal(gen.generate(prompt, 4), hf_tokens(mixture, prompt, 4, do_sample=False))
    assert forgotten == [0, 1, 1]  # new caches at the first call and at each change of batch size, not in between


def test_overlapped_left_padded_prompts_with_eos_equal_generate():
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    trained = InterpolatedLM("embedded:base-large", "embedded:base-small", 0.4)  # real EOS hits, as in beam tests
    ids, mask = padded(UNEVEN)
    got = StaticGenerator.from_interpolated(trained, max_length=64, overlap=True).generate(
        ids, 10, attention_mask=mask, pad_token_id=7, **EOS
    )
    want = trained.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=7, **EOS)
    assert torch.equal(got, want)


def test_overlap_needs_a_decoder(mixture):
    with pytest.raises(ValueError, match="overlap runs the decoder"):
        StaticGenerator(mixture.base, overlap=True)
