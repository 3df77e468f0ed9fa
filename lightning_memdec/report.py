"""The ``memdec evaluate`` report: report.md (a perplexity table, latency), strict-JSON report.json, λ curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_memdec.artifacts import write_json_atomic

__all__ = ["write_report", "plot_curves", "finite_or_none"]


def finite_or_none(obj):
    """report.json stays strict JSON: an infinite perplexity (p_kNN(gold) = 0 somewhere) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.md, report.json and lambda_curve.png under ``out``, each written to a temporary name, then moved."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Memory Decoder evaluation",
        "",
        f"- test: `{report['test']}` ({report['positions'].get('test')} positions), valid: `{report['valid']}`",
        f"- memdec: `{report['memdec']}`; datastore: `{report['datastore']}` (k={report['k']}, "
        f"T={report['temperature']})",
        f"- sliding windows: {report['window']} tokens, stride {report['stride']}; perplexity = exp(−mean log p(gold))",
        "",
        "| base | base ppl | +kNN-LM | +MemDec | MemDec alone | λ MemDec | λ kNN-LM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lam = lambda key, r=r: (
            "—" if r[f"{key}_lambda"] is None else f"{r[f'{key}_lambda']:g} ({r[f'{key}_lambda_from']})"
        )
        lines.append(
            f"| {r['base']} | {_fmt(r['base_ppl'])} | {_fmt(r['knnlm_ppl'])} | {_fmt(r['memdec_ppl'])} | "
            f"{_fmt(r['memdec_alone_ppl'])} | {lam('memdec')} | {lam('knnlm')} |"
        )
    lat = report.get("latency")
    if lat:
        lines += [
            "",
            f"## Latency (median of {lat['repeats']}, batch {lat['input_shape']}, {lat['device']})",
            "",
            "| model | seconds | × base |",
            "|---|---|---|",
        ]
        for key, seconds in lat["seconds"].items():
            lines.append(f"| {key} | {seconds:.4f} | {lat['overhead'][key]:.3f} |")
    lines += ["", "![perplexity against λ](lambda_curve.png)", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "report.md")
    write_json_atomic(out / "report.json", finite_or_none(report))
    plot_curves(report["curves"], out / "lambda_curve.png")


def plot_curves(curves: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # headless: no pyplot, no global backend switch
    ax = fig.add_subplot()
    for name, curve in curves.items():
        for key, style in (("memdec", "-o"), ("knnlm", "--s")):
            if key in curve:
                label = f"{name} + {'MemDec' if key == 'memdec' else 'kNN-LM'}"
                ax.plot(curve["lambda"], curve[key], style, markersize=3, label=label)
    splits = sorted({c["split"] for c in curves.values()})
    ax.set_xlabel("λ (weight of MemDec / kNN)")
    ax.set_ylabel(f"perplexity ({', '.join(splits)})")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
