"""Beam search's bookkeeping around any next-token step, with transformers ``generate()``'s rules.

``generate()``'s beam search calls the model itself and reorders a cache by replacing its tensors; a captured CUDA
graph reads fixed addresses, so :class:`~lightning_memdec.inference.static_generation.StaticGenerator` drives the
loop here and reorders its static caches in place inside its compiled step. The rules are ``generate()``'s
(transformers 5.x, decoder-only, no sampling), so the tokens equal ``InterpolatedLM.generate(num_beams=K)``
(``tests/test_static_generation.py``):

- each step keeps the best ``max(2, 1 + #EOS)·K`` continuations over all beams (spares, in case the best end);
- the best ``K`` that did not end run on; a continuation ends on an EOS id or at the length limit;
- of the ended ones, those among the best ``K`` become hypotheses, scored by their summed log-probs divided by
  (generated length) ** ``length_penalty``; the best ``K`` hypotheses are kept;
- decoding stops when no running beam can beat the worst kept hypothesis (``early_stopping``: False, the
  heuristic at the current length; ``"never"``, at the longest length when ``length_penalty`` > 0; True, as soon
  as ``K`` hypotheses exist).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["beam_search", "EARLY_STOPPING"]

EARLY_STOPPING = (False, True, "never")  #: generate()'s values for ``early_stopping``
_MASKED = -1.0e9  # added to a score that must not be chosen (generate()'s constant: masks add up as there)

# (tokens [B·K, 1], their position, parent rows [B·K]) -> next-token log-probs [B·K, V] (float32). Row r of the
# caches must first take the states of row parents[r]: the beam it extends.
Step = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def beam_search(
    prompt_ids: torch.Tensor,
    prompt_log_probs: torch.Tensor,
    step: Step,
    num_beams: int,
    max_new_tokens: int,
    eos: torch.Tensor,
    pad_token_id: int | None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> torch.Tensor:
    """The best hypothesis per prompt row ``[B, T + n]`` (rows that ended early padded with ``pad_token_id``).

    Args:
        prompt_ids: ``[B, T]`` the prompts.
        prompt_log_probs: ``[B·K, V]`` next-token log-probs after each prompt, repeated for its ``K`` beams.
        step: see :data:`Step`.
        eos: ``[E]`` ids that end a hypothesis (may be empty).
    """
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}.")
    batch, prompt = prompt_ids.shape
    beams, total, device = num_beams, prompt + max_new_tokens, prompt_ids.device
    spares = max(2, 1 + eos.numel()) * beams
    in_top_beams = torch.arange(spares, device=device) < beams  # [S]: only these may become hypotheses
    first_row = torch.arange(batch, device=device)[:, None] * beams  # [B, 1]

    running = torch.full((batch, beams, total), -1 if pad_token_id is None else pad_token_id, device=device)
    running[:, :, :prompt] = prompt_ids[:, None]  # [B, K, total]
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _MASKED  # the K beams start equal: expand only the first
    kept, kept_scores = running.clone(), torch.full((batch, beams), _MASKED, device=device)  # hypotheses
    kept_ended = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    kept_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)  # generated tokens
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    log_probs = prompt_log_probs
    for new in range(max_new_tokens):
        length = prompt + new  # tokens before the one chosen now
        vocab = log_probs.shape[-1]
        scores = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, beams * vocab)
        top_scores, flat = scores.topk(spares)  # [B, S]
        parent, token = flat // vocab, flat % vocab  # [B, S]
        candidates = _take(running, parent)  # [B, S, total]
        candidates[:, :, length] = token
        ended = torch.isin(token, eos) | (length + 1 >= total)  # [B, S]

        # hypotheses: the best K candidates that ended here, merged with those kept
        just_ended = ended & in_top_beams
        ended_scores = top_scores / (new + 1) ** length_penalty
        full = kept_ended.all(-1, keepdim=True) & (early_stopping is True)
        ended_scores = ended_scores + _MASKED * (full.float() + (~improvable).float() + (~just_ended).float())
        best = torch.cat([kept_scores, ended_scores], 1).topk(beams).indices  # [B, K]
        kept = _take(torch.cat([kept, candidates], 1), best)
        kept_scores = torch.cat([kept_scores, ended_scores], 1).gather(1, best)
        kept_ended = torch.cat([kept_ended, just_ended], 1).gather(1, best)
        kept_lengths = torch.cat([kept_lengths, torch.full_like(token, new + 1)], 1).gather(1, best)

        # running beams: the best K candidates that did not end
        open_scores = top_scores + _MASKED * ended.float()
        best = open_scores.topk(beams).indices  # [B, K]
        running, running_scores = _take(candidates, best), open_scores.gather(1, best)
        parents = (parent.gather(1, best) + first_row).view(-1)  # [B·K] rows of the caches they extend

        longest = max_new_tokens if early_stopping == "never" and length_penalty > 0 else new + 1
        best_possible = running_scores[:, :1] / longest**length_penalty  # [B, 1]
        worst_kept = torch.where(kept_ended, kept_scores.min(1, keepdim=True).values, _MASKED)  # [B, K]
        improvable &= (best_possible > worst_kept).any(-1, keepdim=True)
        all_kept = bool(kept_ended.all()) and early_stopping is True
        if not bool(improvable.any()) or all_kept or bool(ended.all()):
            break
        log_probs = step(running[:, :, length].reshape(-1, 1), length, parents)

    return kept[:, 0, : prompt + int(kept_lengths[:, 0].max())]


def _take(sequences: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``sequences[b, index[b, j]]`` for each row ``b``: ``[B, N, L]`` by ``[B, M]`` -> ``[B, M, L]``."""
    return sequences.gather(1, index[..., None].expand(-1, -1, sequences.shape[-1]))
