"""OpenAI's logit_bias, presence_penalty and frequency_penalty: the processor against OpenAI's formula written out
token by token, and a served batch's rows against greedy decoding done by hand over the mixture's forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny

from lightning_memdec.inference.logit_adjustments import LogitAdjustments


def openai_formula(scores: torch.Tensor, generated: list[int], adjust: dict | None) -> torch.Tensor:
    """One row: logit[j] + bias[j] − count[j]·frequency − [count[j] > 0]·presence, over the tokens generated."""
    adjust = adjust or {}
    out = scores.clone().double()
    for token, bias in adjust.get("logit_bias", []):
        out[token] += bias
    for token in set(generated):
        out[token] -= generated.count(token) * adjust.get("frequency_penalty", 0.0)
        out[token] -= adjust.get("presence_penalty", 0.0)
    return out


def test_each_row_gets_its_own_bias_and_penalties_over_its_generated_tokens_only():
    torch.manual_seed(0)
    vocab, width = 11, 4
    prompts = torch.tensor([[3, 3, 3, 5], [0, 0, 7, 7], [1, 2, 3, 4]])  # [B, width]: prompt tokens never count
    generated = [[3, 3, 9], [7, 1, 1], [2, 2, 2]]
    input_ids = torch.cat([prompts, torch.tensor(generated)], dim=1)  # [B, width + 3]
    rows = [
        {"logit_bias": [[0, 5.0], [3, -100.0]], "frequency_penalty": 0.5, "presence_penalty": 1.5},
        None,
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    ]
    scores = torch.randn(3, vocab)
    got = LogitAdjustments(width, rows)(input_ids, scores)
    for row in range(3):
        expected = openai_formula(scores[row], generated[row], rows[row])
        torch.testing.assert_close(got[row].double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(got[1], scores[1])  # a row that asks nothing keeps the model's scores


@pytest.mark.parametrize("adjust", [{"frequency_penalty": 1.5}, {"frequency_penalty": 1.5, "logit_bias": [[2, 1.0]]}])
def test_a_frequency_penalty_alone_applies(adjust):
    """A batch whose rows ask a frequency_penalty and no presence_penalty is still penalised (count·f per token): the
    frequency penalty must not depend on a presence penalty being asked too."""
    torch.manual_seed(1)
    prompts, generated = torch.tensor([[4, 4], [6, 1]]), [[5, 5, 7], [1, 8, 8]]
    input_ids = torch.cat([prompts, torch.tensor(generated)], dim=1)
    scores = torch.randn(2, 10)
    got = LogitAdjustments(2, [adjust, adjust])(input_ids, scores)
    for row in range(2):
        expected = openai_formula(scores[row], generated[row], adjust)
        torch.testing.assert_close(got[row].double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0, 5], scores[0, 5])  # the guard: token 5, generated twice, really lost 2·f


def test_before_any_token_only_the_bias_applies_and_scores_are_not_changed_in_place():
    scores = torch.zeros(2, 5)
    adjustments = LogitAdjustments(3, [{"logit_bias": [[4, 2.0]], "presence_penalty": 1.0}, None])
    got = adjustments(torch.tensor([[4, 4, 4], [1, 1, 1]]), scores)
    assert got.tolist() == [[0, 0, 0, 0, 2.0], [0] * 5] and scores.abs().sum() == 0


def adjusted_greedy(model, prompt: list[int], max_tokens: int, adjust: dict | None) -> list[int]:
    """Greedy decoding by hand: the model's last-position scores, adjusted by OpenAI's formula, argmax, repeat."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            scores = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(openai_formula(scores, out, adjust).argmax())
        out.append(token)
        ids.append(token)
    return out


def test_served_rows_decode_with_their_own_adjustments_beside_rows_without(tmp_path):
    """One generate() call of three rows (left-padded): each row's tokens equal greedy decoding by hand with that
    row's settings; the row without settings equals plain greedy decoding. The biased token is one the model does
    not choose unaided, and a frequency penalty that does change the tokens."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve_worker import generate_steps
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    model = InterpolatedLM(str(save_tiny(tmp_path / "b")), str(save_tiny(tmp_path / "m", n_embd=16, seed=1)), 0.3)
    prompts = [[464, 5827, 373], [40, 588], [50, 50, 50, 50]]
    plain = [adjusted_greedy(model, p, 8, None) for p in prompts]
    banned = plain[0][0]
    settings = [
        {"logit_bias": [[banned, -100.0], [262, 3.0]]},
        None,
        {"frequency_penalty": 2.0, "presence_penalty": 1.0},
    ]
    expected = [adjusted_greedy(model, p, 8, a) for p, a in zip(prompts, settings)]
    assert expected[0] != plain[0] and banned not in expected[0] and expected[2] != plain[2]  # the guards
    jobs = [{"prompt_ids": p, "max_tokens": 8, "sampling": {"do_sample": False}, "adjust": a}
            for p, a in zip(prompts, settings)]  # fmt: skip
    got: list[list[int]] = [[], [], []]
    for step in generate_steps(model, jobs, eos_token_ids=set()):
        for row, out in enumerate(step):
            if out:
                got[row].append(out["token"])
    assert got == expected and got[1] == plain[1]


def test_log_probs_are_the_model_s_own_not_the_adjusted_ones(tmp_path):
    """As vLLM reports them by default: the chosen token's log p under the mixture, whatever bias chose it."""
    pytest.importorskip("litserve")
    from lightning_memdec.apps.serve_worker import generate_steps
    from lightning_memdec.inference.interpolated_lm import InterpolatedLM

    model = InterpolatedLM(str(save_tiny(tmp_path / "b")), str(save_tiny(tmp_path / "m", n_embd=16, seed=1)), 0.3)
    prompt, forced = [464, 5827, 373], 262
    job = {"prompt_ids": prompt, "max_tokens": 1, "sampling": {"do_sample": False}, "logprobs": 0,
           "adjust": {"logit_bias": [[forced, 100.0]]}}  # fmt: skip
    (step,) = list(generate_steps(model, [job], eos_token_ids=set()))
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert step[0]["token"] == forced
    assert step[0]["logprob"] == pytest.approx(float(own[forced]), abs=1e-4) and own[forced] < own.max()
