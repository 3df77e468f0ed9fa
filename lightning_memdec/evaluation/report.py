"""The ``memdec evaluate`` report: report.md (a perplexity table, latency), strict-JSON report.json, λ curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_memdec.io.artifact_dirs import write_json_atomic

__all__ = [
    "write_report",
    "perplexity_table",
    "overlap_lines",
    "interval_table",
    "general_lines",
    "goal_lines",
    "run_lines",
    "plot_curves",
    "finite_or_none",
]
LABELS = {"memdec": "MemDec", "ce_only": "CE-only decoder", "knnlm": "kNN-LM"}
FIGURES = {
    "base_ppl": "alone",
    "knnlm_ppl": "+ kNN-LM",
    "memdec_ppl": "+ MemDec",
    "ce_only_ppl": "+ CE-only",
    "router_ppl": "+ MemDec, router's λ",
    "memdec_alone_ppl": "MemDec alone",
    "ce_only_alone_ppl": "CE-only alone",
    "knn_alone_ppl": "kNN alone",
}


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
    if x is None or (isinstance(x, float) and math.isnan(x)):  # no figure (an interval over one document)
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _lambda(row: dict, key: str) -> str:
    if row.get(f"{key}_lambda") is None:
        return "—"
    edge = " ⚠ edge" if row.get(f"{key}_lambda_at_edge") else ""
    return f"{row[f'{key}_lambda']:g} ({row[f'{key}_lambda_from']}){edge}"


def perplexity_table(report: dict[str, Any]) -> list[str]:
    """The fair rows: each base alone / + kNN-LM (own datastore) / + MemDec / + CE-only, then the teacher's."""
    rows = report["rows"]
    ce = any(r.get("ce_only_ppl") is not None for r in rows)
    head = "| model | alone | + kNN-LM | + MemDec |" + (" + CE-only |" if ce else "") + " λ MemDec |"
    head += (" λ CE-only |" if ce else "") + " λ kNN-LM |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r["base"] if r.get("role", "base") == "base" or r["base"] == "teacher" else f"{r['base']} (teacher)"
        cells = [name, _fmt(r["base_ppl"]), _fmt(r["knnlm_ppl"]), _fmt(r["memdec_ppl"])]
        cells += [_fmt(r.get("ce_only_ppl"))] if ce else []
        cells += [_lambda(r, "memdec")] + ([_lambda(r, "ce_only")] if ce else []) + [_lambda(r, "knnlm")]
        lines.append("| " + " | ".join(cells) + " |")
    alone = next((r for r in rows if r.get("memdec_alone_ppl") is not None), None)
    if alone is not None:
        text = f"MemDec alone: {_fmt(alone['memdec_alone_ppl'])}"
        if alone.get("ce_only_alone_ppl") is not None:
            text += f"; CE-only decoder alone: {_fmt(alone['ce_only_alone_ppl'])}"
        lines += ["", text + "."]
    for r in (r for r in rows if r.get("router_ppl") is not None):
        lines += ["", f"{r['base']} + MemDec with the router's per-token λ: {_fmt(r['router_ppl'])} (mean λ "
                  f"{r['router_mean_lambda']:.3f}; decoder skipped at {100 * r['router_skip_fraction']:.1f} % of "
                  "positions)."]  # fmt: skip
    if any(r.get(f"{key}_lambda_at_edge") for r in rows for key in ("memdec", "ce_only", "knnlm")):
        lines += ["", "⚠ edge: the λ chosen on valid is an end of the grid; the best mixture may lie outside it."]
    return lines


def _temperatures(report: dict[str, Any]) -> str:
    """The kNN temperature: the given one, or each row's T chosen on valid (edge-flagged) and the grid."""
    if not report.get("temperature_grid"):
        return f"T={report['temperature']}"
    chosen = [
        f"{r['base']} {r['knnlm_temperature']:g}{' ⚠ edge' if r.get('knnlm_temperature_at_edge') else ''}"
        for r in report["rows"]
        if r.get("knnlm_temperature") is not None
    ]
    return f"T chosen on valid from {report['temperature_grid']}: {', '.join(chosen)}"


def overlap_lines(report: dict[str, Any]) -> list[str]:
    """The overlap audit: per split, documents found verbatim and positions inside repeated n-gram spans."""
    audit = report.get("overlap")
    if not audit:
        return ["## Overlap audit", "", "No training / datastore text was given (--audit.overlap_with): not audited."]
    lines = ["## Overlap audit", "", f"Against: {', '.join(f'`{a}`' for a in audit['against'])}.", ""]
    lines += [
        "| split | documents | verbatim in training | positions | inside repeated spans | share |",
        "|---|---|---|---|---|---|",
    ]
    for split, a in audit.items():
        if split == "against":
            continue
        warn = " ⚠" if a["warning"] else ""
        words = f" or {a['ngram_words']}-word normalised" if a.get("ngram_words") else ""
        lines.append(
            f"| {split} | {a['documents']} | {a['documents_verbatim']} | {a['positions']} | {a['positions_inside']} "
            f"({a['ngram']}-token{words} spans) | {100 * a['share_inside']:.2f} %{warn} |"
        )
    if any(a["warning"] for k, a in audit.items() if k != "against"):
        lines += [
            "",
            "⚠ more than 1 % of positions repeat training text: read the perplexities outside repeated spans.",
        ]
    return lines


def _with_interval(value, bounds) -> str:
    return _fmt(value) + (f" [{_fmt(bounds[0])}, {_fmt(bounds[1])}]" if bounds else "")


def interval_table(report: dict[str, Any]) -> list[str]:
    """Every perplexity with its 95 % bootstrap interval over documents, on all positions and outside repeated
    spans, and the paired intervals of the key differences."""
    head = "| model | figure | all positions | outside repeated spans |"
    lines = ["## Intervals (95 % bootstrap over documents)", "", head, "|---|---|---|---|"]
    diffs = ["", "| model | difference | all positions | outside repeated spans |", "|---|---|---|---|"]
    infinite = False
    for r in report["rows"]:
        every, outside = r.get("all_positions", {}), r.get("outside_overlap", {})
        for key, label in FIGURES.items():
            if r.get(key) is None or key not in every.get("intervals", {}):
                continue
            out_cell = _with_interval(outside.get("ppl", {}).get(key), outside.get("intervals", {}).get(key))
            lines.append(f"| {r['base']} | {label} | {_with_interval(r[key], every['intervals'][key])} | {out_cell} |")
            infinite = infinite or math.isinf(r[key]) or math.inf in every["intervals"][key]
        for name, d in every.get("differences", {}).items():
            o = outside.get("differences", {}).get(name)
            o_cell = _with_interval(o["difference"], o["interval"]) if o else "—"
            diffs.append(f"| {r['base']} | {name} | {_with_interval(d['difference'], d['interval'])} | {o_cell} |")
    if infinite:
        lines += ["", "∞: p(gold) = 0 at some positions (for kNN alone: no neighbour's value is the gold token), so "
                  "the perplexity, and that of every resample drawing such a document, is infinite."]  # fmt: skip
    return lines + (diffs if len(diffs) > 3 else [])


def _figure(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return _fmt(value) if isinstance(value, float) or value is None else str(value)


def general_lines(report: dict[str, Any]) -> list[str]:
    """The general (out-of-domain) split, when scored: each base alone and + MemDec at its domain λ, intervals."""
    general = report.get("general")
    if not general:
        return []
    lines = [
        f"## General text (`{general['test']}`, {general['positions']} positions; MemDec at each base's domain λ)",
        "",
        "| model | alone | + MemDec | MemDec alone |",
        "|---|---|---|---|",
    ]
    for g in general["rows"]:
        bounds = g["all_positions"]["intervals"]
        cells = [_with_interval(g.get(k), bounds.get(k)) for k in ("base_ppl", "memdec_ppl", "memdec_alone_ppl")]
        lines.append(f"| {g['base']} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(report: dict[str, Any]) -> list[str]:
    """The goals checked, when there are any: met or not, each with the figures it rests on."""
    if not report.get("goals"):
        return []
    lines = ["## Goals (domain test split, all positions)", ""]
    for model, checks in report["goals"].items():
        for name, check in checks.items():
            figures = ", ".join(f"{key} {_figure(value)}" for key, value in check["figures"].items())
            lines.append(f"- {model}: {'✓ met' if check['met'] else '✗ not met'}: {name} ({figures})")
    return lines


def run_lines(report: dict[str, Any]) -> list[str]:
    """How the models were made and where the time went, when the report comes from a whole run (the quickstart)."""
    run = report.get("run")
    if not run:
        return []
    cpu = run.get("cpu_seconds", {})
    seconds = ", ".join(f"{k} {v:.0f} (CPU {cpu.get(k, 0):.0f})" for k, v in run.get("seconds", {}).items())
    settings = ", ".join(f"{k}={v}" for k, v in run.get("budget", {}).items())
    return [
        "## Run",
        "",
        f"- domain: `{run['domain']}` ({run['domain_train_tokens']} train tokens); tokenizer `{run['tokenizer']}`",
        f"- teacher: `{run['teacher_start']}` fine-tuned {run['teacher_steps']} steps; its kNN targets at "
        f"T={run['targets_temperature']['temperature']:g} (chosen on valid)",
        f"- decoders (MemDec and CE-only): from `{run['decoder_start']}`, {run['decoder_steps']} steps each",
        f"- budget: {settings}",
        f"- seconds per stage (wall clock; CPU time of all threads in brackets; ~0 for stages reused from an earlier "
        f"run): {seconds}; total {run.get('total_seconds', 0):.0f} s (CPU {run.get('total_cpu_seconds', 0):.0f})",
    ]


REPORT_FILES = ("report.md", "report.json", "lambda_curve.png")  # what write_report writes under ``out``


def write_report(report: dict[str, Any], out: Path) -> None:
    """REPORT_FILES under ``out``, each written to a temporary name, then moved."""
    out.mkdir(parents=True, exist_ok=True)
    stores = ", ".join(f"{m}: `{s}`" for m, s in report.get("datastores", {}).items()) or "none"
    lines = [
        "# Memory Decoder evaluation",
        "",
        f"- test: `{report['test']}` ({report['positions'].get('test')} positions), valid: `{report['valid']}`",
        f"- memdec: `{report['memdec']}`; CE-only decoder: `{report.get('ce_only')}`; "
        f"teacher: `{report.get('teacher')}`",
        f"- kNN-LM datastores (k={report['k']}, {_temperatures(report)}): {stores}",
        f"- sliding windows: {report['window']} tokens, stride {report['stride']}; perplexity = exp(−mean log p(gold))",
        "",
        *perplexity_table(report),
        "",
        *_section(goal_lines(report)),
        *_section(general_lines(report)),
        *overlap_lines(report),
        "",
        *interval_table(report),
    ]
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
    lines += ["", *_section(run_lines(report)), "![perplexity against λ](lambda_curve.png)", ""]
    markdown, json_file, plot = (out / name for name in REPORT_FILES)
    tmp = markdown.with_name(markdown.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(markdown)
    plot_curves(report["curves"], plot)
    write_json_atomic(json_file, finite_or_none(report))  # last: a report.json means the whole report is there


def _section(lines: list[str]) -> list[str]:
    """A section followed by a blank line, or nothing when it is empty."""
    return [*lines, ""] if lines else []


def plot_curves(curves: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # headless: no pyplot, no global backend switch
    ax = fig.add_subplot()
    for name, curve in curves.items():
        for key, style in (("memdec", "-o"), ("ce_only", ":^"), ("knnlm", "--s")):
            if key in curve:
                label = f"{name} + {LABELS[key]}"
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
