"""The quickstart's goals (issue 19), checked on the shared report schema (``memdec evaluate``'s rows and intervals).

No writer here: report.md, report.json and the figure are :func:`evaluation.report.write_report`'s.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RATIO", "goals"]

RATIO = 0.7  #: base + MemDec must reach at most this fraction of the base's perplexity
CE_DIFFERENCE = "memdec_ppl - ce_only_ppl"  # the row_figures key of the paired difference MemDec − CE-only


def goals(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per base row, each goal as ``{"met": bool, "figures": {...}}``: met on this run's domain test split (all
    positions), with the figures it rests on. A missing or infinite figure never meets a goal."""
    out = {}
    for r in report["rows"]:
        if r.get("role", "base") != "base":
            continue
        mem, base, alone, ce, knn = (r.get(k) for k in ("memdec_ppl", "base_ppl", "memdec_alone_ppl", "ce_only_ppl",
                                                         "knnlm_ppl"))  # fmt: skip
        diff = r.get("all_positions", {}).get("differences", {}).get(CE_DIFFERENCE, {})
        bounds = diff.get("interval") or [math.nan, math.nan]
        out[r["base"]] = {
            f"base + MemDec <= {RATIO} x base": _goal(_le(mem, None if base is None else RATIO * base),
                                                      memdec_ppl=mem, base_ppl=base),
            "base + MemDec < MemDec alone": _goal(_lt(mem, alone), memdec_ppl=mem, memdec_alone_ppl=alone),
            "base + MemDec < base + CE-only": _goal(_lt(mem, ce), memdec_ppl=mem, ce_only_ppl=ce),
            "base + MemDec <= base + kNN-LM": _goal(_le(mem, knn), memdec_ppl=mem, knnlm_ppl=knn),
            "paired 95 % interval of MemDec − CE-only below zero": _goal(
                _lt(bounds[1], 0.0), difference=diff.get("difference"), interval=bounds
            ),
            "MemDec λ strictly inside the grid": _goal(
                r.get("memdec_lambda") is not None and not r.get("memdec_lambda_at_edge"),
                memdec_lambda=r.get("memdec_lambda"), grid=[min(report["lambda_grid"]), max(report["lambda_grid"])],
            ),
        }  # fmt: skip
    return out


def _goal(met: bool, **figures) -> dict[str, Any]:
    return {"met": bool(met), "figures": figures}


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _lt(a, b) -> bool:
    return _finite(a, b) and a < b


def _le(a, b) -> bool:
    return _finite(a, b) and a <= b
