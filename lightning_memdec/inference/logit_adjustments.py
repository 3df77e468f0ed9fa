"""OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``, per row of a ``generate()`` call.

OpenAI's definition: before sampling, token j's logit becomes
``logit[j] + bias[j] − count[j]·frequency_penalty − [count[j] > 0]·presence_penalty``, where count[j] is how often j
was generated so far (the prompt's tokens do not count). Each row has its own request, so its own settings; a row
with none is left as it is.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class LogitAdjustments(LogitsProcessor):
    """Adds each row's logit bias and subtracts its penalties for the tokens it generated after ``prompt_width``
    (the left-padded prompts' width). ``rows``: per row, ``None`` or ``{"logit_bias": [[id, bias], …],
    "presence_penalty": p, "frequency_penalty": f}`` (any key may be absent)."""

    def __init__(self, prompt_width: int, rows: list[dict | None]):
        self.prompt_width = prompt_width
        adjust = [row or {} for row in rows]
        biased = [(r, token, value) for r, row in enumerate(adjust) for token, value in row.get("logit_bias", [])]
        self.bias_rows = torch.tensor([r for r, _, _ in biased], dtype=torch.long)  # [E]
        self.bias_ids = torch.tensor([token for _, token, _ in biased], dtype=torch.long)  # [E]
        self.bias = torch.tensor([value for _, _, value in biased], dtype=torch.float32)  # [E]
        self.presence = torch.tensor([row.get("presence_penalty", 0.0) for row in adjust])  # [B]
        self.frequency = torch.tensor([row.get("frequency_penalty", 0.0) for row in adjust])  # [B]
        self.penalised = bool(self.presence.any() or self.frequency.any())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # [B, V]
        if len(self.bias):
            where = (self.bias_rows.to(scores.device), self.bias_ids.to(scores.device))
            scores.index_put_(where, self.bias.to(scores.device, scores.dtype), accumulate=True)
        generated = input_ids[:, self.prompt_width :]  # [B, t]: the tokens of this call so far
        if self.penalised and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            frequency, presence = (t.to(scores.device, scores.dtype)[:, None] for t in (self.frequency, self.presence))
            scores -= counts * frequency + (counts > 0).to(scores.dtype) * presence
        return scores
