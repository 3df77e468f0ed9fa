"""A report row and a λ curve from per-position log p(gold) arrays: the one definition both ``memdec evaluate`` and
the quickstart use, so their reports share a schema (``lp`` is ``{split: {array name: log p(gold)}}``, arrays named
``base``, ``memdec``, ``ce_only``, ``knn``)."""

from __future__ import annotations

from typing import Any

from lightning_memdec.kernels.scoring import mixed_perplexity, perplexity, sweep_lambda

__all__ = ["MIXTURES", "report_row", "lambda_curve"]

MIXTURES = (("memdec", "memdec"), ("ce_only", "ce_only"), ("knnlm", "knn"))  # (report key, log-prob array)


def report_row(name, base_ref, role, lp, lmbda, knn_lmbda, grid) -> dict[str, Any]:
    """One report row: the model alone and each mixture, λ chosen on valid (or given), flagged at a grid edge."""
    test = lp["test"]
    row: dict[str, Any] = {"base": name, "role": role, "base_path": str(base_ref), "base_ppl": perplexity(test["base"])}
    for key, other in MIXTURES:
        given = knn_lmbda if key == "knnlm" else lmbda
        if other not in test:
            row.update({f"{key}_ppl": None, f"{key}_lambda": None, f"{key}_lambda_from": None})
            continue
        if given is None:
            chosen, _ = sweep_lambda(lp["valid"]["base"], lp["valid"][other], grid)
            row[f"{key}_lambda_from"] = "valid"
            row[f"{key}_valid_ppl"] = mixed_perplexity(lp["valid"]["base"], lp["valid"][other], chosen)
            row[f"{key}_lambda_at_edge"] = chosen in (min(grid), max(grid))
        else:
            chosen = given
            row[f"{key}_lambda_from"] = "given"
        row[f"{key}_lambda"] = chosen
        row[f"{key}_ppl"] = mixed_perplexity(test["base"], test[other], chosen)
    for key, other in MIXTURES:
        row[f"{'knn' if key == 'knnlm' else key}_alone_ppl"] = perplexity(test[other]) if other in test else None
    return row


def lambda_curve(lp, grid) -> dict[str, Any]:
    """Mixed perplexity against λ (with the endpoints) on valid when there is one, else on test."""
    split = "valid" if "valid" in lp else "test"
    lambdas = sorted({0.0, 1.0, *grid})
    curve: dict[str, Any] = {"split": split, "lambda": lambdas}
    for key, other in MIXTURES:
        if other in lp[split]:
            curve[key] = [mixed_perplexity(lp[split]["base"], lp[split][other], x) for x in lambdas]
    return curve
