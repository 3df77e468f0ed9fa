"""Paired accuracy differences of ``memdec downstream`` and the headline they support.

Two questions per base: does a mixture beat the base alone (mixture − base), and does MemDec beat the controls mixed
at its own λ — another general model (the other base: "does any second model help?") and the decoder trained with
CE only (the paper's ablation) — and kNN-LM (MemDec − other mixture). Each difference carries a 95 % paired bootstrap
interval over examples: both systems are resampled with the same draws (:func:`evaluation.intervals.bootstrap_means`,
the one bootstrap of the package), so what they share (easy and hard examples) cancels. A task's draws use
``seed + its position``, so tasks of equal size are not resampled with the same indices, and the mean over tasks is
the mean of the tasks' resampled accuracies, draw by draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_memdec.evaluation.intervals import bootstrap_means, interval
from lightning_memdec.kernels.scoring import lambda_at_edge

__all__ = [
    "MIXTURE_VS_BASE",
    "MEMDEC_VS_OTHER",
    "comparisons",
    "credit",
    "task_draws",
    "paired_differences",
    "describe",
    "headline",
]

MIXTURE_VS_BASE = "mixture − base alone"
MEMDEC_VS_OTHER = "MemDec − other mixture"


def comparisons(results: list[dict]) -> list[tuple[str, str, str]]:
    """``(first, second, what)`` system pairs, difference = first − second: every mixture − its base alone, then
    base + MemDec − every other mixture of the same base (the controls and kNN-LM)."""
    pairs = []
    for base in dict.fromkeys(r["base"] for r in results):
        kinds = {r["system"]: r["kind"] for r in results if r["base"] == base}
        mixtures = [s for s, kind in kinds.items() if kind != "base"]
        pairs += [(s, base, MIXTURE_VS_BASE) for s in mixtures]
        pairs += [(m, s, MEMDEC_VS_OTHER) for m in mixtures if kinds[m] == "memdec" for s in mixtures if s != m]
    return pairs


def credit(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each example's share of a correct answer ``[N]``: 1 when its label alone scores highest, 1/m when it is one of
    m classes tied at the top, else 0. The mean is the accuracy of argmax with ties broken at random, whatever order
    a task lists its classes in: p_kNN alone (λ = 1) gives most verbalizers no mass, their scores tie at exactly 0,
    and argmax's first-listed class would win every tie."""
    top = scores == scores.max(axis=1, keepdims=True)  # [N, C]
    return top[np.arange(len(labels)), labels] / top.sum(axis=1)


def task_draws(results: list[dict], resamples: int, seed: int) -> dict[str, tuple[float, np.ndarray]]:
    """Per system of one task: its accuracy and ``resamples`` bootstrap accuracies, all systems on the same draws."""
    correct = np.stack([credit(r["scores"], r["labels"]) for r in results], axis=1)
    draws = bootstrap_means(correct, resamples, seed)
    return {r["system"]: (float(correct[:, i].mean()), draws[i]) for i, r in enumerate(results)}


def _cell(difference: float, draws: np.ndarray, at_edge: bool) -> dict[str, Any]:
    low, high = interval(draws)
    return {"difference": difference, "ci95": [low, high], "outside": bool(low > 0 or high < 0),
            "lmbda_at_edge": at_edge}  # fmt: skip


def paired_differences(draws: dict[str, dict], results: list[dict], grid) -> dict[str, dict[str, Any]]:
    """``{"first − second": {"what", "tasks": {task: cell}, "mean": cell}}``; a cell is the difference in accuracy,
    its 95 % paired interval, whether the interval excludes 0 and whether a λ of the pair sits at a grid edge.

    ``draws`` is :func:`task_draws` per task; the mean is over the tasks both systems were scored on.
    """
    lmbda = {(r["task"], r["system"]): r["lmbda"] for r in results}

    def edge(task, *systems):
        return any(lmbda.get((task, s)) is not None and lambda_at_edge(lmbda[(task, s)], grid) for s in systems)

    out = {}
    for first, second, what in comparisons(results):
        tasks = [t for t, d in draws.items() if first in d and second in d]
        cells = {}
        for t in tasks:
            (acc_a, draws_a), (acc_b, draws_b) = draws[t][first], draws[t][second]
            cells[t] = _cell(acc_a - acc_b, draws_a - draws_b, edge(t, first, second))
        entry: dict[str, Any] = {"what": what, "tasks": cells, "mean": None}
        if tasks:
            mean_draws = np.mean([draws[t][first][1] - draws[t][second][1] for t in tasks], axis=0)
            mean = float(np.mean([cells[t]["difference"] for t in tasks]))
            entry["mean"] = _cell(mean, mean_draws, any(cells[t]["lmbda_at_edge"] for t in tasks))
        out[f"{first} − {second}"] = entry
    return out


def describe(name: str, where: str, cell: dict) -> str:
    """One difference in percentage points with its interval, e.g. ``a − b on agn +4.8 [+3.9, +5.7]``."""
    low, high = cell["ci95"]
    edge = " (λ at grid edge)" if cell["lmbda_at_edge"] else ""
    return f"{name} on {where} {100 * cell['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{edge}"


def headline(differences: dict[str, dict]) -> str:
    """Which differences lie outside their 95 % paired intervals (gains and losses), per task and for the mean."""
    gains, losses, total = [], [], 0
    for name, entry in differences.items():
        cells = {**entry["tasks"], **({"the mean over tasks": entry["mean"]} if entry["mean"] else {})}
        for where, cell in cells.items():
            total += 1
            if cell["outside"]:
                (gains if cell["difference"] > 0 else losses).append(describe(name, where, cell))
    inside = total - len(gains) - len(losses)
    return (
        f"Outside their 95 % paired intervals — gains: {'; '.join(gains) or 'none'}. Losses: "
        f"{'; '.join(losses) or 'none'}. The other {inside} of {total} differences lie inside their intervals."
    )
