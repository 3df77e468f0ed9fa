"""The quickstart's report: λ grid, the goals checked, report.md and the figure (no model runs here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_memdec.kernels.scoring import lambda_at_edge

EDGE = " ⚠ at grid edge"


def goals(report: dict) -> dict:
    """Per base, the method's goals (issue 10): each True when met on this run's domain test split."""
    out = {}
    for r in report["results"]:
        out[r["base"]] = {
            "base + MemDec <= 0.7 x base": r["memdec_ppl"] <= 0.7 * r["base_ppl"],
            "base + MemDec < MemDec alone": r["memdec_ppl"] < report["memdec_alone_ppl"],
            "base + MemDec <= base + kNN-LM": r["memdec_ppl"] <= r["knnlm_ppl"],
            "base + MemDec < base + CE-only": r["memdec_ppl"] < r["ce_only_ppl"],
            "MemDec λ strictly inside the grid": not lambda_at_edge(r["lambda"]),
        }
    return out


def _lam(x: float) -> str:
    return f"{x:.2f}{EDGE if lambda_at_edge(x) else ''}"


def write_markdown(report: dict, path: Path) -> None:
    t = report["teacher"]
    lines = [
        f"Domain test perplexity ({report['test_positions']} positions of {report['domain']}; "
        f"{report['domain_train_tokens']} domain train tokens); every λ and kNN temperature T chosen on the domain "
        "valid split. General: embedded:general/test, at the domain λ.",
        "",
        "| model | domain test ppl | vs base | λ | kNN T | general test ppl |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        b, name = r["base_ppl"], r["base"]

        def rel(x: float, b: float = b) -> str:
            return f"{100 * (x / b - 1):+.1f}%"

        lines += [
            f"| {name} | {b:.2f} | | | | {r['general_base_ppl']:.2f} |",
            f"| {name} + kNN-LM (own datastore) | {r['knnlm_ppl']:.2f} | {rel(r['knnlm_ppl'])} "
            f"| {_lam(r['knnlm_lambda'])} | {r['knnlm_temperature']:g} | |",
            f"| {name} + MemDec | {r['memdec_ppl']:.2f} | {rel(r['memdec_ppl'])} | {_lam(r['lambda'])} | "
            f"| {r['general_memdec_ppl']:.2f} |",
            f"| {name} + CE-only decoder | {r['ce_only_ppl']:.2f} | {rel(r['ce_only_ppl'])} "
            f"| {_lam(r['ce_only_lambda'])} | | |",
        ]
    lines += [
        f"| teacher ({t['start']} fine-tuned {t['steps']} steps) | {t['ppl']:.2f} | | | | |",
        f"| teacher + kNN-LM (teacher datastore; the ceiling MemDec imitates) | {t['knnlm_ppl']:.2f} | "
        f"| {_lam(t['knnlm_lambda'])} | {t['knnlm_temperature']:g} | |",
        f"| MemDec alone | {report['memdec_alone_ppl']:.2f} | | | | {report['general_memdec_alone_ppl']:.2f} |",
        f"| CE-only decoder alone | {report['ce_only_alone_ppl']:.2f} | | | | |",
        "",
        "The teacher + kNN-LM row needs the fine-tuned teacher and a datastore search at inference; MemDec needs "
        "one small decoder forward and serves every base of the tokenizer.",
        "",
    ]
    for base, checks in report.get("goals", {}).items():
        marks = ", ".join(f"{'✓' if ok else '✗'} {name}" for name, ok in checks.items())
        lines.append(f"- goals for {base}: {marks}")
    cpu = report.get("cpu_seconds", {})
    seconds = ", ".join(f"{k} {v:.0f} (CPU {cpu.get(k, 0):.0f})" for k, v in report.get("seconds", {}).items())
    lines += [
        "",
        f"Seconds per stage (wall clock; CPU time of all threads in brackets; ~0 for stages reused from an earlier "
        f"run): {seconds}; total {report.get('total_seconds', 0):.0f} s "
        f"(CPU {report.get('total_cpu_seconds', 0):.0f}).",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["base"] for r in report["results"]]
    x = np.arange(len(names))
    bars = [("base_ppl", "base"), ("knnlm_ppl", "+ kNN-LM"), ("ce_only_ppl", "+ CE-only"), ("memdec_ppl", "+ MemDec")]
    for i, (key, label) in enumerate(bars):
        left.bar(x + (i - 1.5) * 0.2, [r[key] for r in report["results"]], 0.2, label=label)
    left.axhline(report["teacher"]["knnlm_ppl"], ls="--", color="k", label="teacher + kNN-LM")
    left.axhline(report["memdec_alone_ppl"], ls=":", color="grey", label="MemDec alone")
    left.set_xticks(x, names)
    left.set_ylabel("domain test perplexity")
    left.legend(fontsize=8)
    for r in report["results"]:
        lam = [float(k) for k in r["valid_ppl_by_lambda"]]
        right.plot(lam, list(r["valid_ppl_by_lambda"].values()), marker="o", label=r["base"])
        right.axvline(r["lambda"], ls=":", color=right.lines[-1].get_color())
    right.set_xlabel("λ (weight of the Memory Decoder)")
    right.set_ylabel("domain valid perplexity")
    right.set_yscale("log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
