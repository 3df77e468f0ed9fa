"""The ``memdec downstream`` report: accuracy per task and system with bootstrap intervals, report.md/json, a figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lightning_memdec.evaluation.downstream_differences import headline, paired_differences, task_draws
from lightning_memdec.evaluation.downstream_general import mixture_label
from lightning_memdec.evaluation.intervals import bootstrap_means, interval
from lightning_memdec.io.artifact_dirs import write_json_atomic
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID, lambda_at_edge

__all__ = ["bootstrap_interval", "accuracy_summary", "write_downstream_report", "plot_accuracy"]


def bootstrap_interval(correct, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean accuracy over examples (:mod:`evaluation.intervals`' bootstrap)."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        raise ValueError("no examples: an accuracy over nothing has no interval.")
    low, high = interval(bootstrap_means(correct[:, None], n_resamples, seed)[0], level)
    return low, high


def accuracy_summary(results: list[dict], n_resamples: int = 1000, seed: int = 0, grid=None) -> dict[str, Any]:
    """Accuracy, 95% interval and λ (flagged at an end of ``grid``) per task and system, each system's mean over
    tasks with its interval, the paired differences (:mod:`evaluation.downstream_differences`) and the headline.

    Task ``i`` (in order of appearance) is resampled with ``seed + i``; all systems of a task share its draws.
    """
    grid = list(DEFAULT_LAMBDA_GRID if grid is None else grid)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    draws = {t: task_draws([r for r in results if r["task"] == t], n_resamples, seed + i) for i, t in enumerate(tasks)}
    per_task: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for r in results:
        acc, resampled = draws[r["task"]][r["system"]]
        per_task[r["task"]][r["system"]] = {
            "accuracy": acc,
            "ci95": interval(resampled),
            "n": int(r["labels"].size),
            "lmbda": r["lmbda"],
            "lmbda_from": r["lmbda_from"],
            "lmbda_at_edge": r["lmbda"] is not None and lambda_at_edge(r["lmbda"], grid),
            "dev_accuracy_by_lambda": r["dev_curve"],
            "knn_temperature": r["knn_temperature"],
            "knn_temperature_from": r["knn_temperature_from"],
            "knn_temperature_at_edge": r["knn_temperature_at_edge"],
            "dev_accuracy_by_knn_temperature": r["dev_accuracy_by_temperature"],
        }
    systems = list(dict.fromkeys(r["system"] for r in results))
    mean, mean_ci = {}, {}
    for s in systems:
        scored = [t for t in tasks if s in draws[t]]
        mean[s] = float(np.mean([draws[t][s][0] for t in scored]))
        mean_ci[s] = interval(np.mean([draws[t][s][1] for t in scored], axis=0))
    differences = paired_differences(draws, results, grid)
    return {
        "systems": systems,
        "accuracy": per_task,
        "mean_accuracy": mean,
        "mean_accuracy_ci95": mean_ci,
        "differences": differences,
        "headline": headline(differences),
        "bootstrap": {
            "resamples": n_resamples,
            "seed": seed,
            "seed_of_task_i": "seed + i",
            "level": 0.95,
            "method": "percentile, paired over examples",
        },  # fmt: skip
    }


EDGE = " ⚠ at grid edge"


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    return f"{100 * c['accuracy']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"


def _difference_cell(c: dict | None) -> str:
    """A difference in points with its paired interval; bold when the interval excludes 0, flagged at a grid edge."""
    if c is None:
        return "—"
    text = f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
    return (f"**{text}**" if c["outside"] else text) + (" ⚠" if c["lmbda_at_edge"] else "")


def _general_ppl(report: dict, system: str, cell: dict) -> str:
    general = report.get("general")
    label = mixture_label(cell["lmbda"], cell["knn_temperature"])
    entry = ((general or {}).get("mixtures", {}).get(system) or {}).get(label)
    return "" if entry is None else f"; general ppl {entry['ppl']:.2f}"


def _lambda_cell(report: dict, system: str, cell: dict) -> str:
    """λ (where it came from), a kNN-LM's T (where it came from), each flagged at a grid edge, the general ppl."""
    text = f"{cell['lmbda']:g} ({cell['lmbda_from']}){EDGE if cell['lmbda_at_edge'] else ''}"
    if cell["knn_temperature"] is not None:
        edge = EDGE if cell["knn_temperature_at_edge"] else ""
        text += f", T={cell['knn_temperature']:g} ({cell['knn_temperature_from']}){edge}"
    return text + _general_ppl(report, system, cell)


def _accuracy_lines(report: dict) -> list[str]:
    systems, acc = report["systems"], report["accuracy"]
    lines = ["| task | n | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    for task, cells in acc.items():
        n = next(iter(cells.values()))["n"]
        lines.append(f"| {task} | {n} | " + " | ".join(_cell(cells.get(s)) for s in systems) + " |")
    means, ci = report["mean_accuracy"], report["mean_accuracy_ci95"]
    row = [f"{100 * means[s]:.1f} [{100 * ci[s][0]:.1f}, {100 * ci[s][1]:.1f}]" for s in systems]
    return lines + ["| **mean** | | " + " | ".join(row) + " |"]


def _difference_lines(report: dict) -> list[str]:
    tasks = list(report["accuracy"])
    lines = [
        "Paired differences in accuracy (points, first − second) with their 95 % paired bootstrap intervals over "
        "examples; **bold**: the interval excludes 0; ⚠: a λ of the pair at an end of the λ grid. Every mixture, "
        "controls included, has its own λ, chosen as MemDec's is.",
        "",
        "| difference | what | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, entry in report["differences"].items():
        cells = [_difference_cell(entry["tasks"].get(t)) for t in tasks] + [_difference_cell(entry["mean"])]
        lines.append(f"| {name} | {entry['what']} | " + " | ".join(cells) + " |")
    return lines


def _lambda_lines(report: dict) -> list[str]:
    systems, acc = report["systems"], report["accuracy"]
    mixed = [s for s in systems if any((acc[t].get(s) or {}).get("lmbda") is not None for t in acc)]
    if not mixed:
        return []
    where = " and that mixture's general perplexity" if report.get("general") else ""
    lines = [f"λ (and kNN-LM's T) per task, where each came from{where}:", "", "| task | " + " | ".join(mixed) + " |"]
    lines.append("|---|" + "---|" * len(mixed))
    for task, cells in acc.items():
        row = [_lambda_cell(report, s, cells[s]) if s in cells else "—" for s in mixed]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return lines


def _general_lines(general: dict | None) -> list[str]:
    if not general:
        return []
    lines = [
        f"General perplexity on `{general['split']}` ({general['tokens']} tokens, {general['documents']} documents; "
        f"sliding windows of {general['window']}, stride {general['stride']}) with 95 % bootstrap intervals over "
        "documents; each mixture at every λ its tasks used:",
        "",
        "| model or mixture | λ (a kNN-LM's: at T) | general ppl [95 % interval] |",
        "|---|---|---|",
    ]
    for name, e in general["models"].items():
        lines.append(f"| {name} | | {e['ppl']:.2f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] |")
    for system, by_label in general["mixtures"].items():
        for label, e in by_label.items():
            lines.append(f"| {system} | {label} | {e['ppl']:.2f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}] |")
    return lines


def _temperature_note(report: dict) -> str:
    if not report.get("knn_temperature_grid"):
        return ""
    return (f"; kNN-LM's T with it over {report['knn_temperature_grid']} "
            f"({report['knn_temperature']:g} for a task without dev)")  # fmt: skip


REPORT_FILES = ("report.md", "report.json", "accuracy.png", "predictions.jsonl")  # what a downstream run writes


def write_downstream_report(report: dict[str, Any], out: Path) -> None:
    """report.md, report.json and accuracy.png under ``out`` (REPORT_FILES but the predictions), each written to a
    temporary name, then moved."""
    out.mkdir(parents=True, exist_ok=True)
    controls = ", ".join(f"`{c}`" for c in report.get("controls") or []) or "none"
    lines = [
        "# Zero-shot classification (DCPMI, kNN-Prompt protocol)",
        "",
        f"- bases: {', '.join(f'`{b}`' for b in report['bases'])}; memdec: `{report['memdec']}`; "
        f"kNN-LM datastores: {', '.join(f'`{d}`' for d in report['datastores']) or 'none'}; "
        f"controls (each with its own λ, chosen as MemDec's): {controls}",
        f"- score: {report['scoring']}; {report['verbalizers']} verbalizers",
        f"- accuracy in % with a 95% bootstrap interval ({report['bootstrap']['resamples']} resamples, "
        f"seed {report['bootstrap']['seed']} + the task's position); λ chosen on dev over {report['lambda_grid']}"
        + _temperature_note(report),
        "",
        f"**Headline.** {report['headline']}",
        "",
        *_accuracy_lines(report),
        "",
        *_difference_lines(report),
        "",
        *_lambda_lines(report),
        "",
        *_general_lines(report.get("general")),
        "",
        "![accuracy per task](accuracy.png)",
        "",
    ]
    markdown, json_file, plot, _ = (out / name for name in REPORT_FILES)
    tmp = markdown.with_name(markdown.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(markdown)
    write_json_atomic(json_file, report)
    plot_accuracy(report["accuracy"], report["systems"], plot)


def plot_accuracy(acc: dict[str, dict], systems: list[str], path: Path) -> None:
    """Grouped bars: accuracy per task, one bar per system, with its 95% interval as an error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(acc)
    fig = Figure(figsize=(max(6.4, 1.1 * len(tasks) + 2), 4.2))
    FigureCanvasAgg(fig)  # headless: no pyplot, no global backend switch
    ax = fig.add_subplot()
    width = 0.8 / max(len(systems), 1)
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i, t in enumerate(tasks) if system in acc[t]]
        cells = [acc[t][system] for t in tasks if system in acc[t]]
        heights = [100 * c["accuracy"] for c in cells]
        errors = [
            [100 * (c["accuracy"] - c["ci95"][0]) for c in cells],
            [100 * (c["ci95"][1] - c["accuracy"]) for c in cells],
        ]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=system)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def write_predictions(results: list[dict], path: Path) -> None:
    """predictions.jsonl: one line per task × system × example (task, id, system, scores per class, pred, label,
    and ``tied``: how many classes share the top score; the accuracy gives such an example 1/tied when its label is
    among them)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            for i, (ex_id, label) in enumerate(zip(r["ids"], r["labels"].tolist())):
                row = r["scores"][i]
                scores = {name: float(s) for name, s in zip(r["class_names"], row)}
                line = {"task": r["task"], "id": ex_id, "system": r["system"], "scores": scores,
                        "pred": int(row.argmax()), "label": int(label),
                        "tied": int((row == row.max()).sum())}  # fmt: skip
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
