"""The scoring maths, defined once: kNN distributions, gold-token log-probs, the λ mixture, perplexity.

Everything that scores text (kNN targets, the kNN-LM, InterpolatedLM, CrossModelEval, ``memdec evaluate``, the
quickstart) calls these. Most of it needs only the gold token's probability: a mixture at any λ is

    log p_mix(gold) = log((1 − λ)·p_base(gold) + λ·p_other(gold))

of two per-position arrays, so a λ sweep costs no extra model call. No Lightning, faiss or transformers here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "DEFAULT_LAMBDA_GRID",
    "DEFAULT_TEMPERATURE_GRID",
    "lambda_at_edge",
    "check_lmbda",
    "check_lambda_grid",
    "knn_scores",
    "knn_gold_log_probs",
    "vocab_logits",
    "vocab_log_probs",
    "gold_log_probs",
    "log_softmax_summary",
    "mix_log_probs",
    "perplexity",
    "mixed_perplexity",
    "sweep_lambda",
    "sweep_temperature",
]

#: The one λ grid of every sweep (``memdec evaluate``, the quickstart): 0, 0.05, …, 0.95, 1. Both ends are in it:
#: λ = 0 is the base alone, λ = 1 the other model alone; a choice at an end is flagged (:func:`lambda_at_edge`).
DEFAULT_LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
#: The kNN-LM temperatures tried on the valid split (the paper's 16 in the middle).
DEFAULT_TEMPERATURE_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


# -- p_kNN -------------------------------------------------------------------------------------------------------------


def knn_scores(distances: np.ndarray | torch.Tensor, temperature: float, nearest=None) -> np.ndarray | torch.Tensor:
    """The kNN-LM's neighbour logits ``(min_k d_k − d_j) / T`` ``[n, k]``: p(neighbour j) = softmax_j of them.

    ``distances`` are squared L2 (+inf for a missing neighbour, which scores −inf). Shifting by the row's nearest
    distance leaves the softmax unchanged but keeps exp() of a score in (0, 1]. The dtype is kept (the sparse
    target builder works in float32); ``nearest`` [n, 1] passes row minima a caller already has. A torch tensor
    gives a tensor on its device, by the same arithmetic (a true division by T, as numpy's).
    """
    if isinstance(distances, torch.Tensor):
        if nearest is None:
            nearest = distances.amin(dim=1, keepdim=True)
        # a 0-d tensor (true division, as numpy's), filled where it is used: no copy from the host, so a step
        # captured as a CUDA graph can hold it
        divisor = torch.full((), temperature, dtype=distances.dtype, device=distances.device)
        return (nearest - distances).div_(divisor)
    if nearest is None:
        nearest = distances.min(axis=1, keepdims=True)
    scores = np.subtract(nearest, distances)
    scores /= scores.dtype.type(temperature)
    return scores


def knn_gold_log_probs(distances: np.ndarray, is_gold: np.ndarray | torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_kNN(gold) ``[n]`` float64 = log Σ_{j: v_j = gold} softmax_j(−d_j / T), without any ``[n, V]`` row.

    ``is_gold`` ``[n, k]`` marks the neighbours whose value is the gold token; −inf where none is.
    """
    scores = torch.from_numpy(knn_scores(np.asarray(distances, dtype=np.float64), temperature))
    gold_scores = scores.masked_fill(~torch.as_tensor(is_gold, dtype=torch.bool), -math.inf)
    return torch.logsumexp(gold_scores, dim=-1) - torch.logsumexp(scores, dim=-1)


# -- base LMs ----------------------------------------------------------------------------------------------------------


def vocab_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The first ``vocab`` columns of logits ``[..., R]`` as float32: the tokenizer's ids only.

    An LM head padded beyond the tokenizer (R > vocab, as Qwen's) is sliced *before* normalising, so padding
    rows get no probability mass; float32 so that half-precision models normalise without overflow.
    """
    return logits[..., :vocab].float()


def vocab_log_probs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p ``[..., vocab]`` float32 over the tokenizer's ids: :func:`vocab_logits`, then log-softmax."""
    return torch.log_softmax(vocab_logits(logits, vocab), dim=-1)


def gold_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, vocab: int, logsumexp: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(label) ``[...]`` float32 from logits ``[..., R]``, normalised over the first ``vocab`` ids only.

    The head is sliced as :func:`vocab_logits` does; the gold entry minus logsumexp avoids a ``[..., vocab]``
    log-prob tensor (``logsumexp`` ``[...]`` passes one a caller already has). Labels of −100 (not scored) give 0.
    """
    logits = vocab_logits(logits, vocab)
    labels = labels.to(logits.device)
    if logsumexp is None:
        logsumexp = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - logsumexp
    return lp.masked_fill(labels == -100, 0.0)


#: Rows of ``[rows, V]`` fp32 temporaries per chunk in :func:`log_softmax_summary` (two of 32 MiB at V = 50,257).
SUMMARY_CHUNK_ELEMENTS = 1 << 23


def log_softmax_summary(logits: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logsumexp z, entropy of softmax z, max log-prob)``, each ``[...]`` float32, of logits ``[..., R]`` over
    the first ``vocab`` ids, with one exp pass and no ``[..., vocab]`` log-prob tensor.

    With ``d = z − max z``, ``e = exp d`` and ``s = Σ e``: logsumexp = max z + log s, the entropy
    −Σ p log p = log s − Σ e·d / s, and the largest log-prob is −log s. Rows are processed in chunks, so the
    temporaries stay small whatever the batch. Log-probs are valid logits too (their logsumexp is 0).
    """
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, logits.shape[-1])  # [N, R], a view where the layout allows
    lse, entropy, top = (torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device) for _ in range(3))
    step = max(1, SUMMARY_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows.shape[0], step):
        z = rows[start : start + step, :vocab].float()  # [r, vocab]
        m = z.amax(-1)
        m = torch.where(torch.isfinite(m), m, 0.0)  # an all −inf row: no NaN from −inf − (−inf)
        d = z - m[:, None]  # [r, vocab], ≤ 0
        e = d.exp()
        s = e.sum(-1)
        e_dot_d = d.nan_to_num_(neginf=0.0).mul_(e).sum(-1)  # Σ e·d in d's memory; e = 0 where d = −inf
        log_s = s.log()
        lse[start : start + step] = m + log_s
        entropy[start : start + step] = log_s - e_dot_d / s
        top[start : start + step] = -log_s
    return lse.view(lead), entropy.view(lead), top.view(lead)


# -- the mixture -------------------------------------------------------------------------------------------------------


def check_lmbda(lmbda: float) -> float:
    """λ is a mixture weight; anything outside [0, 1] (or NaN) is not a distribution, so refuse it early; so is a
    bool or a string (``True`` read as 1.0, ``"0.3"`` parsed, hid a caller's mistake)."""
    try:
        if isinstance(lmbda, (bool, str, bytes)):
            raise TypeError(type(lmbda).__name__)
        value = float(lmbda)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lmbda must be a number in [0, 1] (the Memory Decoder's weight), got {lmbda!r}.") from err
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"lmbda must be in [0, 1] (the Memory Decoder's weight in the mixture; 0 = base only, 1 = decoder only), "
            f"got {lmbda!r}."
        )
    return value


def mix_log_probs(base: torch.Tensor, other: torch.Tensor, lmbda: float | torch.Tensor) -> torch.Tensor:
    """``log((1 − λ)·p_base + λ·p_other)`` elementwise from two log-probability tensors (numpy: torch.from_numpy).

    λ = 0 and λ = 1 return the corresponding input itself: going through ``log(0) = −inf`` would be exact in
    principle but is special-cased so the endpoints are bit-identical to the single models. A tensor λ (a learned
    router's, one per position) broadcasts against the inputs (``[B, T, 1]`` for ``[B, T, V]`` log-probs); where it
    is 0 the result is ``base`` exactly, whatever ``other`` holds there (a decoder that did not run).
    """
    if isinstance(lmbda, torch.Tensor):
        return _mix_per_position(base, other, lmbda)
    lmbda = check_lmbda(lmbda)
    if lmbda == 0.0:
        return base
    if lmbda == 1.0:
        return other
    log_base_w, log_other_w = math.log1p(-lmbda), math.log(lmbda)
    needs_grad = torch.is_grad_enabled() and (base.requires_grad or other.requires_grad)
    if needs_grad or base.shape != other.shape or base.dtype != other.dtype:
        return torch.logaddexp(base + log_base_w, other + log_other_w)
    # Same value, one [.., V] allocation instead of three: logaddexp(a + c1, b + c2) = c1 + logaddexp(a, b + c2 - c1).
    # At vocabulary width, allocating (page-faulting) fresh tensors costs more than the arithmetic.
    out = other + (log_other_w - log_base_w)
    torch.logaddexp(base, out, out=out)
    return out.add_(log_base_w)


def _mix_per_position(base: torch.Tensor, other: torch.Tensor, lmbda: torch.Tensor) -> torch.Tensor:
    """The same mixture with λ a tensor (differentiable in λ: a router is trained through it)."""
    if not torch.is_grad_enabled() or not lmbda.requires_grad:
        if bool(((lmbda < 0) | (lmbda > 1) | lmbda.isnan()).any()):
            raise ValueError("a per-position λ must lie in [0, 1] everywhere (the decoder's weight in the mixture).")
    lmbda = lmbda.to(base.dtype)
    skipped = lmbda == 0
    other = torch.where(skipped, base, other)  # where the decoder's weight is 0 its value must not matter (NaN, inf)
    return torch.where(skipped, base, torch.logaddexp(base + torch.log1p(-lmbda), other + torch.log(lmbda)))


def perplexity(log_probs: np.ndarray | torch.Tensor) -> float:
    """exp(−mean log p(gold)); the mean is over positions, so every scored token weighs the same."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.size == 0:
        raise ValueError("no scored positions: perplexity of an empty text is undefined.")
    return float(np.exp(-log_probs.mean()))


def mixed_perplexity(base, other, lmbda: float) -> float:
    """Perplexity of the λ mixture of two per-position gold log-prob arrays (numpy arrays or tensors)."""
    base, other = torch.as_tensor(base, dtype=torch.float64), torch.as_tensor(other, dtype=torch.float64)
    return perplexity(mix_log_probs(base, other, lmbda))


def check_lambda_grid(grid) -> list[float]:
    """Every λ of a sweep grid checked; an empty grid has no best λ."""
    grid = [check_lmbda(g) for g in grid]
    if not grid:
        raise ValueError("lambda_grid is empty; give at least one λ in [0, 1] (e.g. 0, 0.05, …, 1).")
    return grid


def sweep_lambda(base, other, grid=DEFAULT_LAMBDA_GRID) -> tuple[float, list[float]]:
    """The λ of ``grid`` with the lowest mixed perplexity (first on ties), and the perplexity at every λ.

    ``base`` and ``other`` are per-position gold log-probs (numpy arrays or tensors).
    """
    grid = check_lambda_grid(grid)
    ppls = [mixed_perplexity(base, other, lmbda) for lmbda in grid]
    return grid[int(np.argmin(ppls))], ppls


def lambda_at_edge(lmbda: float, grid=DEFAULT_LAMBDA_GRID) -> bool:
    """A λ chosen at an end of its grid: the best mixture may lie outside the grid (or be a single model)."""
    return lmbda <= min(grid) or lmbda >= max(grid)


def sweep_temperature(base, knn_by_temperature: dict, grid=DEFAULT_LAMBDA_GRID, lmbda: float | None = None) -> dict:
    """The kNN temperature with the lowest kNN-LM perplexity (its λ swept on ``grid``, or ``lmbda`` when given).

    ``knn_by_temperature`` maps each candidate T to log p_kNN(gold) per position at T, ``base`` the base's; all on
    the split used for choosing (valid). First T on ties.
    """
    if not knn_by_temperature:
        raise ValueError("no kNN temperature to choose from; give at least one (e.g. 1, 2, 4, …, 64).")
    scores = {}
    for t, knn in knn_by_temperature.items():
        lam = sweep_lambda(base, knn, grid)[0] if lmbda is None else lmbda
        scores[t] = (mixed_perplexity(base, knn, lam), lam)
    best = min(scores, key=lambda t: scores[t][0])
    return {"temperature": best, "lambda": scores[best][1], "ppl_by_temperature": {t: v[0] for t, v in scores.items()}}


# -- sliding windows -------------------------------------------------------------------------------------------------
