"""StaticGenerator: static caches and compiled steps give generate()'s tokens (greedy, sampled and beam)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny
from transformers import GenerationConfig, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from lightning_memdec.hf.loading import load_causal_lm
from lightning_memdec.inference.interpolated_lm import InterpolatedLM
from lightning_memdec.inference.static_generation import StaticGenerator

PROMPTS = [[464, 3290, 373, 257, 1310], [40, 588, 257, 1310, 286]]  # two rows of one length
EOS = {"eos_token_id": [13, 11]}  # '.' and ','


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


def test_default_sampling_is_generates_top_50(trained_mixture):
    """Unset settings take generate()'s defaults (top-k 50 when sampling), not "no filter"."""
    prompt = torch.tensor(PROMPTS)
    torch.manual_seed(3)
    want = hf_tokens(trained_mixture, prompt, 10, do_sample=True)
    torch.manual_seed(3)
    got = StaticGenerator.from_interpolated(trained_mixture, max_length=64).generate(prompt, 10, do_sample=True)
    assert torch.equal(got, want)


SAMPLING = [
    ({"temperature": 0.7, "top_k": 40, "top_p": 0.9}, 11, 10),
    # generate() applies top-k, then top-p over the k survivors. At temperature 3 the distribution is flat: the 0.5
    # nucleus of the whole vocabulary is far wider than k=3, so top-p first and then top-k would sample among 3
    # tokens, where generate() samples among the one or two tokens of the nucleus of the renormalised top 3
    ({"temperature": 3.0, "top_k": 3, "top_p": 0.5}, 7, 12),
]


@pytest.mark.parametrize("settings, seed, steps", SAMPLING, ids=["default-like", "top-k-before-top-p"])
def test_sampled_tokens_equal_generate_under_one_seed(mixture, settings, seed, steps):
    prompt = torch.tensor(PROMPTS)
    torch.manual_seed(seed)
    want = hf_tokens(mixture, prompt, steps, do_sample=True, **settings)
    torch.manual_seed(seed)
    got = StaticGenerator.from_interpolated(mixture, max_length=64).generate(prompt, steps, do_sample=True, **settings)
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


def test_unset_settings_come_from_the_models_generation_config(trained_mixture):
    """As generate(): the model's EOS ids end rows, padded with its pad id (or, unset, the first EOS id)."""
    prompt = torch.tensor(PROMPTS)
    eos = trained_mixture.generation_config.eos_token_id
    trained_mixture.generation_config.eos_token_id = [13]
    try:
        gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
        want = trained_mixture.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(gen.generate(prompt, 12), want)
        assert bool((want[:, -1] == trained_mixture.generation_config.pad_token_id).any())  # a row did end early
        base = trained_mixture.base
        alone = StaticGenerator(base, max_length=64).generate(prompt, 12, eos_token_id=[13])
        assert base.generation_config.pad_token_id is None  # so generate() pads with the first EOS id
        assert torch.equal(alone, base.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[13]))
    finally:
        trained_mixture.generation_config.eos_token_id = eos


@pytest.mark.parametrize("rows", [1, 3])
def test_batch_rows_pads_every_batch_to_one_size_and_changes_no_token(trained_mixture, rows):
    ids, mask = padded(UNEVEN[:rows])
    settings = {"attention_mask": mask, "eos_token_id": [13, 11], "pad_token_id": 7}
    fixed = StaticGenerator.from_interpolated(trained_mixture, max_length=64, batch_rows=4)
    got = fixed.generate(ids, 10, **settings)
    assert fixed._caches[0].layers[0].keys.shape[0] == 4  # the caches (and the compiled step) are 4 rows wide
    assert torch.equal(
        got, StaticGenerator.from_interpolated(trained_mixture, max_length=64).generate(ids, 10, **settings)
    )
    with pytest.raises(ValueError, match="5 prompts exceed the generator's batch_rows=4"):
        fixed.generate(torch.tensor([UNEVEN[1]] * 5), 2)


def test_requests_it_cannot_serve_are_refused(mixture, tiny_gpt2):
    gen = StaticGenerator.from_interpolated(mixture, max_length=16)
    with pytest.raises(ValueError, match="exceeds the static caches' 16 positions"):
        gen.generate(torch.tensor(PROMPTS[:1]), 12)
    for bad in (0, -3, 5.0, None, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            gen.generate(torch.tensor(PROMPTS[:1]), bad)
    assert gen.generate(torch.tensor(PROMPTS[:1]), torch.tensor(2)).shape == (1, 7)  # any integer type
    for ids in (torch.zeros(0, 5, dtype=torch.long), torch.tensor(PROMPTS, dtype=torch.float)):
        with pytest.raises(ValueError, match="input_ids must be \\[batch ≥ 1, time ≥ 1\\] integer token ids"):
            gen.generate(ids, 2)
    for bad in (-1, gen.vocab_size):  # were a bare IndexError in the embedding
        with pytest.raises(ValueError, match=f"input_ids hold {bad}, not a token id of \\[0, {gen.vocab_size}\\)"):
            gen.generate(torch.tensor([[5, bad, 7]]), 2)
    with pytest.raises(ValueError, match="beam search here neither samples"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="early_stopping"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="applies .*repetition_penalty.*InterpolatedLM.generate"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, repetition_penalty=1.3)  # would be ignored: other tokens
    gen.generate(torch.tensor(PROMPTS[:1]), 2, repetition_penalty=1.0, output_scores=False)  # generate()'s defaults
    with pytest.raises(ValueError, match="not GenerationConfig fields: \\['num_beam'\\]"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, num_beam=2)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="max_length must be a positive integer"):
            StaticGenerator(mixture.base, max_length=bad)
    with pytest.raises(ValueError, match="max_length=600 exceeds the models' context of 512 positions"):
        StaticGenerator(load_causal_lm(tiny_gpt2), max_length=600)  # before any cache is allocated
    gen.generate(torch.tensor(PROMPTS[:1]), 2, num_beams=2)
    gen._caches[0].layers[0] = DynamicLayer()  # as a model with recurrent or other per-row state would have
    with pytest.raises(ValueError, match="reorders attention caches only; .* DynamicLayer"):
        gen.generate(torch.tensor(PROMPTS[:1]), 2, num_beams=2)
    router_lm = InterpolatedLM(mixture.base, mixture.memdec, 0.4)
    router_lm.router = object()  # any router: skips are data-dependent
    with pytest.raises(ValueError, match="fixed λ"):
        StaticGenerator.from_interpolated(router_lm)


@pytest.fixture(scope="module")
def trained_mixture():
    """The shipped base LMs as base and decoder: trained models whose beams really diverge and meet EOS (random
    tiny models repeat one token on every beam)."""
    return InterpolatedLM("embedded:base-large", "embedded:base-small", 0.4)


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS])
def test_beam_search_tokens_equal_generate(trained_mixture, rows, beams):
    prompt = torch.tensor(rows)
    want = hf_tokens(trained_mixture, prompt, 10, num_beams=beams, do_sample=False)
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    got = gen.generate(prompt, 10, num_beams=beams)
    assert torch.equal(got, want)
    assert not torch.equal(got, gen.generate(prompt, 10))  # the beams really search: greedy differs here
    base_alone = StaticGenerator(trained_mixture.base, max_length=64).generate(prompt, 10, num_beams=beams)
    assert torch.equal(base_alone, hf_tokens(trained_mixture.base, prompt, 10, num_beams=beams, do_sample=False))


@pytest.mark.parametrize(
    "settings",
    [{}, {"length_penalty": 0.0}, {"length_penalty": 2.0}, {"length_penalty": 2.0, "early_stopping": "never"},
     {"early_stopping": True}, {"eos_token_id": [11]}, {"eos_token_id": [11], "early_stopping": True}],
)  # fmt: skip
def test_beam_hypotheses_that_end_at_eos_equal_generate(trained_mixture, settings):
    """'.' and ',' end hypotheses: several lengths, scored with the length penalty, padded; generate() stops early
    under some settings, and so must this (the same number of forwards)."""
    prompt = torch.tensor(PROMPTS)
    kwargs = {"num_beams": 3, "eos_token_id": [13, 11], "pad_token_id": 7, **settings}
    forwards = []
    hook = trained_mixture.base.register_forward_hook(lambda *_: forwards.append(1))
    want = trained_mixture.generate(prompt, max_new_tokens=12, do_sample=False, **kwargs)
    hf_forwards = len(forwards)
    got = StaticGenerator.from_interpolated(trained_mixture, max_length=64).generate(prompt, 12, **kwargs)
    hook.remove()
    assert torch.equal(got, want)
    assert len(forwards) - hf_forwards == hf_forwards


def test_beam_search_covers_early_ends_and_padding(trained_mixture):
    """The settings above really exercise what they claim: early stops and padded hypotheses."""
    prompt = torch.tensor(PROMPTS)
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    ends = {"num_beams": 3, "eos_token_id": [13, 11], "pad_token_id": 7}
    assert gen.generate(prompt, 12, early_stopping=True, **ends).shape[1] < prompt.shape[1] + 12
    assert bool((gen.generate(prompt, 12, **ends) == 7).any())


def test_a_generation_config_gives_what_its_fields_give(trained_mixture):
    """The config generate() takes works here too (fields given as keywords win), a model's own included."""
    prompt = torch.tensor(PROMPTS)
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    config = GenerationConfig(num_beams=3, length_penalty=0.0, eos_token_id=[13, 11], pad_token_id=7)
    want = gen.generate(prompt, 12, num_beams=3, length_penalty=0.0, eos_token_id=[13, 11], pad_token_id=7)
    assert torch.equal(gen.generate(prompt, 12, config), want)
    assert torch.equal(
        gen.generate(prompt, 12, config, num_beams=1), gen.generate(prompt, 12, **{**EOS, "pad_token_id": 7})
    )
    assert config.num_beams == 3  # the caller's config is not changed
    model_config = trained_mixture.base.generation_config  # bos/eos ids and flags from generation_config.json
    assert torch.equal(gen.generate(prompt, 12, model_config, pad_token_id=7), gen.generate(prompt, 12,
               eos_token_id=model_config.eos_token_id, pad_token_id=7))  # fmt: skip


def test_a_generation_config_leaves_what_it_does_not_set_to_the_model_s(trained_mixture):
    """As generate(): a config that sets only do_sample (or a temperature) keeps the model's EOS ids and top-k; they
    were dropped for generate()'s global defaults (rows ran past the model's EOS, sampling kept the top 50)."""
    prompt = torch.tensor(PROMPTS)
    saved = trained_mixture.generation_config
    trained_mixture.generation_config = GenerationConfig(eos_token_id=[13], pad_token_id=0, top_k=3)
    try:
        gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
        for config in (GenerationConfig(do_sample=False), GenerationConfig(do_sample=True, temperature=0.9)):
            torch.manual_seed(7)
            want = trained_mixture.generate(prompt, generation_config=config, max_new_tokens=12)
            torch.manual_seed(7)
            assert torch.equal(gen.generate(prompt, 12, config), want), config
        assert bool((want[:, -1] == 0).any())  # the guard: a row ended at the model's EOS and was padded
    finally:
        trained_mixture.generation_config = saved


def test_beam_step_reorders_in_place_and_compiles_into_one_graph(trained_mixture):
    torch._dynamo.reset()
    prompt = torch.tensor(PROMPTS)
    compiled = StaticGenerator.from_interpolated(trained_mixture, max_length=64, compile=True, backend="eager")
    got = compiled.generate(prompt, 8, num_beams=3)
    addresses = [layer.keys.data_ptr() for cache in compiled._caches for layer in cache.layers]
    assert torch.equal(got, hf_tokens(trained_mixture, prompt, 8, num_beams=3, do_sample=False))
    assert torch.equal(compiled.generate(prompt, 8, num_beams=3), got)
    assert [layer.keys.data_ptr() for cache in compiled._caches for layer in cache.layers] == addresses


def padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_memdec.hf.left_padding import left_pad

    return left_pad(rows, pad)


UNEVEN = [[464, 3290, 373, 257, 1310, 13, 383], [40, 588, 257], [1849, 11, 262, 995]]  # three lengths


@pytest.mark.parametrize("settings", [{}, {"num_beams": 3}, {"eos_token_id": [13, 11], "pad_token_id": 7}])
def test_left_padded_prompts_equal_generate_and_each_row_alone(trained_mixture, settings):
    ids, mask = padded(UNEVEN)
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    got = gen.generate(ids, 10, attention_mask=mask, **settings)
    base = {"pad_token_id": 0, "eos_token_id": None, **settings}
    want = trained_mixture.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **base)
    assert torch.equal(got, want)
    alone = [gen.generate(torch.tensor([row]), 10, **settings)[0] for row in UNEVEN]
    for row, prompt, one in zip(got, UNEVEN, alone):  # padding changes nothing a row generates
        width = ids.shape[1] - len(prompt)
        assert torch.equal(row[width : width + len(one)], one)


def test_sampled_left_padded_prompts_equal_generate_under_one_seed(trained_mixture):
    ids, mask = padded(UNEVEN)
    settings = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "pad_token_id": 0}
    torch.manual_seed(5)
    want = trained_mixture.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, **settings)
    torch.manual_seed(5)
    got = StaticGenerator.from_interpolated(trained_mixture, max_length=64).generate(ids, 8, attention_mask=mask,
                                                                                     **settings)  # fmt: skip
    assert torch.equal(got, want)


def test_stopping_criteria_and_streamer_as_generate_uses_them(trained_mixture):
    """Per-row budgets and a per-row end test (the server's criterion: row 1 ends at its 4th token, as at a stop
    string) and a streamer see what they see in generate()."""
    from lightning_memdec.inference.streamed_generation import RowEnds, StepStreamer

    ids, mask = padded(UNEVEN)
    runs = []
    for model in (trained_mixture, StaticGenerator.from_interpolated(trained_mixture, max_length=64)):
        streamer, seen = StepStreamer(), []

        def fourth(token: int, seen: list = seen) -> bool:
            seen.append(token)
            return len(seen) == 4

        ends = RowEnds(ids.shape[1], [3, 9, 5], [None, fourth, None])
        criteria = StoppingCriteriaList([ends])
        out = model.generate(ids, max_new_tokens=12, attention_mask=mask, stopping_criteria=criteria,
                             streamer=streamer, eos_token_id=[13], pad_token_id=0)  # fmt: skip
        runs.append((out, list(iter(streamer.steps.get, None)), ends.ended_at, seen))
    (want, want_steps, want_ended, want_seen), (got, got_steps, got_ended, got_seen) = runs
    assert torch.equal(got, want) and got_steps == want_steps
    assert got.shape[1] == ids.shape[1] + 5  # stopped when row 1 ended and the longest other budget was spent
    assert got_ended == want_ended == [None, 4, None] and got_seen == want_seen == want[1, ids.shape[1] :][:4].tolist()


def test_bad_attention_masks_are_refused(trained_mixture):
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    ids, mask = padded(UNEVEN)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="0 on left padding and 1 on every token after it"):
        gen.generate(ids, 2, attention_mask=right)
    with pytest.raises(ValueError, match="must have input_ids' shape"):
        gen.generate(ids, 2, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="a row of padding only"):
        gen.generate(ids, 2, attention_mask=torch.cat([mask[:2], torch.zeros_like(mask[:1])]))
    with pytest.raises(ValueError, match="must have input_ids' shape"):  # all ones, so nothing padded: still checked
        gen.generate(ids, 2, attention_mask=torch.ones(len(ids), ids.shape[1] + 2))
    with pytest.raises(ValueError, match="0 \\(left padding\\) and 1 \\(tokens\\) only"):
        gen.generate(ids, 2, attention_mask=mask * 0.5 + 0.5)  # not read as padding by a cast to integers


def test_the_padded_step_compiles_into_one_graph_for_every_batch_size(trained_mixture):
    """The served path (a mask and positions per row, spare rows) traces as one graph, compiled once by warm_up:
    batches of 3 and 1 prompts then reuse it (a backend that counts what dynamo hands it)."""
    torch._dynamo.reset()
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    ids, mask = padded(UNEVEN)
    compiled = StaticGenerator.from_interpolated(trained_mixture, max_length=64, compile=True, backend=counting,
                                                 batch_rows=4)  # fmt: skip
    compiled.warm_up()
    assert len(graphs) == 1
    got = compiled.generate(ids, 6, attention_mask=mask, eos_token_id=None)
    want = trained_mixture.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)
    compiled.generate(torch.tensor(UNEVEN[:1]), 6, eos_token_id=None)
    assert len(graphs) == 1


def test_a_models_length_settings_leave_max_new_tokens_in_charge(tiny_gpt2):
    """Llama's generation_config.json carries max_length: as in generate(), an explicit max_new_tokens wins over a
    config's max_length or max_new_tokens (they were refused as unapplied settings)."""
    base, prompt = load_causal_lm(tiny_gpt2), torch.tensor(PROMPTS)
    want = hf_tokens(base, prompt, 5, do_sample=False)
    for lengths in ({"max_length": 4096}, {"max_new_tokens": 2048}):
        base.generation_config = GenerationConfig(**lengths)
        assert torch.equal(StaticGenerator(base, max_length=64).generate(prompt, 5, eos_token_id=None), want)
        config = GenerationConfig(do_sample=False, **lengths)
        assert torch.equal(StaticGenerator(base, max_length=64).generate(prompt, 5, config), want)


def test_two_models_of_two_tokenizers_are_refused_as_interpolated_lm_refuses_them(tmp_path, tiny_gpt2):
    neox = save_tiny(tmp_path / "neox", arch="gpt_neox", vocab=50304, tokenizer="gpt-neox-20b")
    with pytest.raises(ValueError, match="StaticGenerator\\(base, memdec\\): .* uses neox \\(vocab 50277"):
        StaticGenerator(load_causal_lm(tiny_gpt2), load_causal_lm(neox), lmbda=0.5)
    memdec = save_tiny(tmp_path / "memdec", seed=5)  # one tokenizer: the pair mixes as its InterpolatedLM does
    direct = StaticGenerator(load_causal_lm(tiny_gpt2), load_causal_lm(memdec), lmbda=0.4, max_length=64)
    lm = InterpolatedLM(str(tiny_gpt2), str(memdec), 0.4)
    assert direct.vocab_size == lm.config.vocab_size == 50257
    prompt = torch.tensor(PROMPTS)
    assert torch.equal(direct.generate(prompt, 6, eos_token_id=None), hf_tokens(lm, prompt, 6, do_sample=False))


def test_a_plain_list_of_stopping_criteria_works_as_in_generate(trained_mixture):
    from transformers import MaxLengthCriteria

    prompt = torch.tensor(PROMPTS)
    gen = StaticGenerator.from_interpolated(trained_mixture, max_length=64)
    got = gen.generate(prompt, 10, stopping_criteria=[MaxLengthCriteria(prompt.shape[1] + 4)], eos_token_id=None)
    want = trained_mixture.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                    stopping_criteria=[MaxLengthCriteria(prompt.shape[1] + 4)])  # fmt: skip
    assert torch.equal(got, want) and got.shape[1] == prompt.shape[1] + 4


def test_spare_rows_draw_no_random_numbers(trained_mixture):
    """With batch_rows, only the prompts' rows are sampled: under one seed the tokens are generate()'s."""
    ids, mask = padded(UNEVEN[:2])
    settings = {"attention_mask": mask, "do_sample": True, "top_k": 0, "eos_token_id": None}
    torch.manual_seed(5)
    want = trained_mixture.generate(ids, max_new_tokens=8, **settings)
    torch.manual_seed(5)
    got = StaticGenerator.from_interpolated(trained_mixture, max_length=64, batch_rows=4).generate(ids, 8, **settings)
    assert torch.equal(got, want)


def test_two_eos_ids_and_no_pad_id_pad_ended_rows_with_the_first_as_generate(mixture):
    """generate() pads a finished row with the first EOS id when no pad id is set, whichever EOS id ended it: here
    row 0 ends on the second id."""
    base, prompt = mixture.base, torch.tensor(PROMPTS)
    assert base.generation_config.pad_token_id is None
    e = int(StaticGenerator(base, max_length=64).generate(prompt, 1, eos_token_id=None)[0, -1])  # row 0's first token
    eos = [99 if e != 99 else 98, e]
    want = base.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    got = StaticGenerator(base, max_length=64).generate(prompt, 6, eos_token_id=eos)
    assert torch.equal(got, want)
    assert want[0, prompt.shape[1]] == e and bool((want[0, prompt.shape[1] + 1 :] == eos[0]).all())  # the guard
    assert want.shape[1] > prompt.shape[1] + 1  # row 1 ran on, so row 0 really was padded


def test_batch_rows_spare_rows_never_keep_decoding_past_a_stopping_criterion(mixture):
    """The spare rows of batch_rows are no prompt's: once every prompt's row met the criterion, decoding stops, as
    generate() stops."""
    from transformers import MaxLengthCriteria

    prompt = torch.tensor(PROMPTS)
    stop = prompt.shape[1] + 3
    want = mixture.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                            stopping_criteria=[MaxLengthCriteria(stop)])  # fmt: skip
    gen = StaticGenerator.from_interpolated(mixture, max_length=64, batch_rows=4)
    got = gen.generate(prompt, 8, eos_token_id=None, stopping_criteria=[MaxLengthCriteria(stop)])
    assert torch.equal(got, want) and got.shape[1] == stop


def test_max_length_may_be_the_models_whole_context(tiny_gpt2):
    """A prompt + new tokens may fill every position the model attends to (512): such a generator was refused."""
    from lightning_memdec.hf.loading import context_length

    base = load_causal_lm(tiny_gpt2)
    context = context_length(base)
    gen = StaticGenerator(base, max_length=context)
    prompt = torch.randint(0, 50257, (1, context - 4), generator=torch.Generator().manual_seed(0))
    got = gen.generate(prompt, 4, eos_token_id=None)
    assert got.shape[1] == context
    assert torch.equal(got, hf_tokens(base, prompt, 4, do_sample=False))


def test_beam_search_with_stopping_criteria_is_refused_not_ignored(mixture):
    """Beam search here applies no stopping criteria: a criterion must be refused, not silently dropped (generate()
    would stop at it)."""
    from transformers import MaxLengthCriteria

    gen = StaticGenerator.from_interpolated(mixture, max_length=32)
    prompt = torch.tensor(PROMPTS[:1])
    with pytest.raises(ValueError, match="nor takes stopping_criteria"):
        gen.generate(prompt, 8, num_beams=2, stopping_criteria=[MaxLengthCriteria(prompt.shape[1] + 3)])


def test_stopping_criteria_see_every_token_the_last_included_as_in_generate(mixture):
    """generate() calls the criteria after every token, the last one too: a row whose end test is met by its last
    budgeted token is recorded as ended there (the server reports it as a stop), and a recording criterion sees
    max_new_tokens tokens."""
    from transformers import StoppingCriteria

    from lightning_memdec.inference.streamed_generation import RowEnds

    class Seen(StoppingCriteria):
        def __init__(self):
            self.tokens = []

        def __call__(self, input_ids, scores, **kwargs):
            self.tokens.append(input_ids[:, -1].tolist())
            return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)

    prompt, new = torch.tensor(PROMPTS), 4
    runs = []
    for model in (mixture, StaticGenerator.from_interpolated(mixture, max_length=64)):
        seen, fed = Seen(), []
        ends = RowEnds(prompt.shape[1], [new, new], [None, lambda t, fed=fed: (fed.append(t), len(fed) == new)[1]])
        out = model.generate(prompt, max_new_tokens=new, stopping_criteria=StoppingCriteriaList([seen, ends]),
                             eos_token_id=None, pad_token_id=0, do_sample=False)  # fmt: skip
        runs.append((out, seen.tokens, ends.ended_at))
    (want, want_seen, want_ended), (got, got_seen, got_ended) = runs
    assert torch.equal(got, want)
    assert got_seen == want_seen == want[:, prompt.shape[1] :].T.tolist() and len(got_seen) == new
    assert got_ended == want_ended == [None, new]


def test_a_stopping_criterion_without_eos_ids_lets_the_row_run_on_as_generate(mixture):
    """generate() pads a stopped row only when EOS ids are given: with none (and a pad id set), a row a criterion
    stopped goes on generating its own tokens while another row runs, and so must StaticGenerator's."""
    from transformers import StoppingCriteria

    class FirstRowAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
            done[0] = input_ids.shape[1] - len(PROMPTS[0]) >= 3
            return done

    base, prompt = mixture.base, torch.tensor(PROMPTS)
    settings = {"eos_token_id": None, "pad_token_id": 0}
    want = base.generate(
        prompt, max_new_tokens=8, do_sample=False, stopping_criteria=[FirstRowAfterThree()], **settings
    )
    got = StaticGenerator(base, max_length=64).generate(prompt, 8, stopping_criteria=[FirstRowAfterThree()], **settings)
    assert torch.equal(got, want)
    assert want.shape[1] == prompt.shape[1] + 8 and bool((want[0, prompt.shape[1] + 3 :] != 0).any())  # the guard
