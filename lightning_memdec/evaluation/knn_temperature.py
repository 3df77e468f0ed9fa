"""The kNN-LM temperature of ``memdec evaluate``, chosen on valid as the quickstart chooses it (``memdec downstream``
chooses it on a task's dev split with the same scorer names).

One base pass and one neighbour search per batch give log p_kNN(gold) at every candidate temperature (only the
softmax over the same distances changes), so trying a grid of temperatures costs no extra model call or search.
The choice rule itself is :func:`kernels.scoring.sweep_temperature`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_memdec.inference.knnlm import KNNLM
from lightning_memdec.inference.sliding_window import ScoreFn
from lightning_memdec.kernels.scoring import gold_log_probs, knn_gold_log_probs, lambda_at_edge, sweep_temperature

__all__ = ["check_temperatures", "knn_key", "knn_temperatures_scorer", "settle_temperature"]


def check_temperatures(temperatures) -> list[float]:
    """Every candidate kNN temperature a finite number > 0, at least one of them."""
    values = [float(t) for t in temperatures]
    if not values or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(
            f"temperature_grid (and temperature) must be finite numbers > 0, at least one; got {list(temperatures)}."
        )
    return values


def knn_key(temperature: float) -> str:
    """The scorer's output name for log p_kNN(gold) at one temperature."""
    return f"knn@{float(temperature):g}"


def knn_temperatures_scorer(knnlm: KNNLM, temperatures) -> ScoreFn:
    """Base log p(gold) (``base``) and log p_kNN(gold) at each temperature (:func:`knn_key`), from one pass."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, keys = knnlm.base_forward(input_ids)
        labels = labels.to(logits.device)
        base = gold_log_probs(logits, labels, knnlm.vocab).double().cpu()
        scored = (labels != -100).cpu()
        out = {"base": base}
        if scored.any():
            dist, tokens = knnlm.neighbours(keys[scored.to(keys.device)])
            is_gold = tokens == labels.cpu()[scored].reshape(-1, 1).numpy()
        for t in temperatures:
            knn = torch.zeros_like(base)
            if scored.any():
                knn[scored] = knn_gold_log_probs(dist, is_gold, t)
            out[knn_key(t)] = knn
        return out

    return score


def settle_temperature(lp: dict[str, dict[str, np.ndarray]], temperatures, grid, lmbda: float | None) -> dict:
    """Choose T on valid (on test when there is no valid: then one T must be given), keep its arrays as ``knn``.

    ``lp`` is {split: {name: log p(gold)}} from :func:`knn_temperatures_scorer`; returns the report's fields.
    """
    temperatures = [float(t) for t in temperatures]
    if "valid" in lp:
        valid = lp["valid"]
        choice = sweep_temperature(valid["base"], {t: valid[knn_key(t)] for t in temperatures}, grid, lmbda)
        chosen, source = choice["temperature"], "valid"
        by_t = {f"{t:g}": v for t, v in choice["ppl_by_temperature"].items()}
    elif len(temperatures) == 1:
        chosen, source, by_t = temperatures[0], "given", None
    else:
        raise ValueError("several kNN temperatures but no valid split to choose among them; pass --valid.")
    for arrays in lp.values():
        arrays["knn"] = arrays[knn_key(chosen)]
        for t in temperatures:
            del arrays[knn_key(t)]
    return {
        "knnlm_temperature": chosen,
        "knnlm_temperature_from": source,
        "knnlm_valid_ppl_by_temperature": by_t,
        "knnlm_temperature_at_edge": source == "valid"
        and len(temperatures) > 1
        and lambda_at_edge(chosen, temperatures),
    }
