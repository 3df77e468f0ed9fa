"""The ``memdec downstream`` report: accuracy per task and system with bootstrap intervals, report.md/json, a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_memdec.io.artifact_dirs import write_json_atomic

__all__ = ["bootstrap_interval", "accuracy_summary", "write_downstream_report", "plot_accuracy"]


def bootstrap_interval(correct, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean accuracy: ``n_resamples`` resamples of the examples with replacement.

    ``np.random.default_rng(seed).integers(0, n, (n_resamples, n))`` draws the resamples, so every system of a task
    (same n, same seed) is resampled on the same examples.
    """
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        raise ValueError("no examples: an accuracy over nothing has no interval.")
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, correct.size, size=(n_resamples, correct.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_summary(results: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, 95% interval and λ per task and system, and each system's mean accuracy over tasks."""
    systems = list(dict.fromkeys(r["system"] for r in results))
    per_task: dict[str, dict[str, Any]] = {}
    for r in results:
        correct = r["scores"].argmax(axis=1) == r["labels"]
        low, high = bootstrap_interval(correct, n_resamples, seed)
        per_task.setdefault(r["task"], {})[r["system"]] = {
            "accuracy": float(correct.mean()),
            "ci95": [low, high],
            "n": int(correct.size),
            "lmbda": r["lmbda"],
            "lmbda_from": r["lmbda_from"],
            "dev_accuracy_by_lambda": r["dev_curve"],
        }
    mean = {
        s: float(np.mean([cells[s]["accuracy"] for cells in per_task.values() if s in cells]))
        for s in systems
        if any(s in cells for cells in per_task.values())
    }
    return {
        "systems": systems,
        "accuracy": per_task,
        "mean_accuracy": mean,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile"},
    }


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    return f"{100 * c['accuracy']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"


def write_downstream_report(report: dict[str, Any], out: Path) -> None:
    """report.md, report.json and accuracy.png under ``out``, each written to a temporary name, then moved."""
    out.mkdir(parents=True, exist_ok=True)
    systems, acc = report["systems"], report["accuracy"]
    lines = [
        "# Zero-shot classification (DCPMI, kNN-Prompt protocol)",
        "",
        f"- bases: {', '.join(f'`{b}`' for b in report['bases'])}; memdec: `{report['memdec']}`; "
        f"kNN-LM datastores: {', '.join(f'`{d}`' for d in report['datastores']) or 'none'}",
        f"- score: {report['scoring']}; {report['verbalizers']} verbalizers",
        f"- accuracy in % with a 95% bootstrap interval ({report['bootstrap']['resamples']} resamples, "
        f"seed {report['bootstrap']['seed']})",
        "",
        "| task | n | " + " | ".join(systems) + " |",
        "|---|---|" + "---|" * len(systems),
    ]
    for task, cells in acc.items():
        n = next(iter(cells.values()))["n"]
        lines.append(f"| {task} | {n} | " + " | ".join(_cell(cells.get(s)) for s in systems) + " |")
    means = report["mean_accuracy"]
    lines.append("| **mean** | | " + " | ".join(f"{100 * means[s]:.1f}" if s in means else "—" for s in systems) + " |")
    mixed = [s for s in systems if any((acc[t].get(s) or {}).get("lmbda") is not None for t in acc)]
    if mixed:
        lines += ["", "λ per task (where it came from):", "", "| task | " + " | ".join(mixed) + " |"]
        lines.append("|---|" + "---|" * len(mixed))
        for task, cells in acc.items():
            row = [f"{cells[s]['lmbda']:g} ({cells[s]['lmbda_from']})" if s in cells else "—" for s in mixed]
            lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines += ["", "![accuracy per task](accuracy.png)", ""]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out / "report.md")
    write_json_atomic(out / "report.json", report)
    plot_accuracy(acc, systems, out / "accuracy.png")


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
