"""Per-token log-probabilities of what a model generates or is given: OpenAI's ``logprobs`` and ``echo``.

A served model answers with the log-probability of each token it chose and of the ``top`` most likely tokens at
that step, under the distribution it decodes from (the mixture for :class:`InterpolatedLM`), before temperature or
top-p. :class:`StepLogProbs` records them during ``generate()``; :func:`prompt_log_probs` scores a prompt's tokens
in one forward pass (the first token has no context, so no log-probability).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from lightning_memdec.kernels.scoring import vocab_log_probs

LOWEST_LOG_PROB = -9999.0  # what log p = -inf is sent as: JSON has no infinity (vLLM's convention)


def scored_tokens(log_probs: torch.Tensor, chosen: torch.Tensor, top: int) -> list[tuple[float, list[list]]]:
    """For rows of log-probs ``[N, V]`` and the token chosen in each ``[N]``: (its log p, the ``top`` most likely
    ``[[id, log p], …]``, most likely first), as plain numbers that cross a process boundary as JSON."""
    chosen_lp = log_probs.gather(1, chosen.reshape(-1, 1).to(log_probs.device))[:, 0].clamp(min=LOWEST_LOG_PROB)
    best_lp, best_ids = log_probs.topk(min(top, log_probs.shape[1]), dim=1)
    best_lp = best_lp.clamp(min=LOWEST_LOG_PROB)
    return [
        (lp, [[i, p] for i, p in zip(ids, lps)])
        for lp, ids, lps in zip(chosen_lp.tolist(), best_ids.tolist(), best_lp.tolist())
    ]


class TokenizerIdsOnly(LogitsProcessor):
    """Gives a head's rows past the tokenizer's ``vocab`` ids no probability: a padded head (Pythia, Qwen) keeps
    some mass there, and a base decoded alone would otherwise draw ids that are no token."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.vocab:
            return scores
        return scores.index_fill(-1, torch.arange(self.vocab, scores.shape[-1], device=scores.device), -float("inf"))


class StepLogProbs(LogitsProcessor):
    """A logits processor that changes nothing and keeps the step's log-probs ``[B, vocab]`` (float32): placed
    before generate()'s temperature and top-p warpers, it sees the model's own distribution."""

    def __init__(self, vocab: int | None = None):
        self.vocab = vocab
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = vocab_log_probs(scores, self.vocab or scores.shape[-1])
        return scores


@torch.no_grad()
def prompt_log_probs(model, prompt_ids: list[int], top: int, vocab: int | None = None) -> list:
    """``[None, (log p(t_1 | t_0), top), …]``: each prompt token's log-probability given the ones before it and the
    ``top`` most likely tokens there (:func:`scored_tokens`), from one forward pass of ``model`` over the prompt."""
    ids = torch.tensor([prompt_ids], device=model.device)  # [1, T]
    if ids.shape[1] < 2:
        return [None]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # [T-1, R]: the prediction of tokens 1 … T-1
    log_probs = vocab_log_probs(logits, vocab or logits.shape[-1])
    return [None, *scored_tokens(log_probs, ids[0, 1:], top)]
