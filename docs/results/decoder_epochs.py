"""Decoder training budget: the Memory Decoder and the CE-only decoder trained for E epochs, chosen on valid.

Each E is a separate run (its own warm-up and cosine decay over E epochs of steps) with the quickstart's start (the
smallest base), learning rate, batch, window and β, on a finished quickstart run's corpora and teacher targets (the
teacher is not retrained). Both decoders always get the same steps. Every decoder is scored on the run's domain
valid split, alone and mixed with each base at its valid-best λ (kernels.scoring's grid), with a 95 % bootstrap
interval over documents and a paired interval of its difference from the best E of the same decoder (and of
MemDec − CE-only at the same E). E = 1 is the baseline run's own decoder when it trained one epoch; its training
time is the one the baseline's report.json records. Training times are wall and CPU seconds of this process.

python docs/results/decoder_epochs.py --baseline RUN --out DIR [--epochs [1,2,3,4]] [--decoders [memdec,ce-only]]
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from jsonargparse import CLI

from lightning_memdec.apps.quickstart_stages import (
    Budget,
    StageClock,
    done,
    epoch_steps,
    gold_log_probs,
    parameters,
    train_model,
)
from lightning_memdec.evaluation.intervals import bootstrap_perplexities, document_sums, interval
from lightning_memdec.evaluation.overlap import split_document_offsets
from lightning_memdec.io.artifact_dirs import write_json_atomic
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.kernels.scoring import (
    DEFAULT_LAMBDA_GRID,
    lambda_at_edge,
    mix_log_probs,
    perplexity,
    sweep_lambda,
)

DECODERS = ("memdec", "ce-only")
STAGE = {"memdec": "train memdec", "ce-only": "train ce-only"}  # the baseline report's stage names


def baseline_run(baseline: Path) -> tuple[dict, Budget]:
    """The baseline quickstart's settings and budget, refusing a run whose corpora or targets are not finished."""
    path = baseline / "quickstart_settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"--baseline {baseline} holds no quickstart run ({path} is missing).")
    for part in ("corpora/domain-train", "corpora/domain-valid", "targets/train", "targets/valid"):
        if not done(baseline / part):
            raise FileNotFoundError(
                f"--baseline {baseline}: {baseline / part} is not finished; wait until the quickstart has built "
                "its teacher targets (the 'targets' stage), then rerun."
            )
    settings = json.loads(path.read_text())
    return settings, Budget(**{f.name: settings[f.name] for f in fields(Budget)})


def bases_of(settings: dict, baseline: Path) -> dict[str, str]:
    """The baseline's bases by name, as the quickstart names them (its own pretrained ones with --pretrain_bases)."""
    if settings["pretrain_bases"]:
        return {name: str(baseline / "models" / name) for name in ("base-small", "base-large")}
    return {Path(ref.removeprefix("embedded:")).name or ref: ref for ref in settings["base"]}


def baseline_decoder(baseline: Path, settings: dict, kind: str, steps: int) -> tuple[Path, dict] | None:
    """The baseline's own decoder and its recorded training time, when it trained exactly ``steps`` steps."""
    model, report = baseline / "models" / kind, baseline / "report.json"
    if settings["memdec_steps"] not in (None, steps) or not done(model) or not report.is_file():
        return None
    run = json.loads(report.read_text())["run"]
    times = {"seconds": run["seconds"][STAGE[kind]], "cpu_seconds": run["cpu_seconds"][STAGE[kind]]}
    if times["seconds"] == 0:  # the baseline reused this decoder from an earlier run: its time is not known here
        return None
    return model, times


def trained_decoder(kind: str, epochs: int, ctx: dict) -> tuple[Path, dict]:
    """Decoder ``kind`` after ``epochs`` epochs: the baseline's for one epoch when it has it, else trained here."""
    steps = epochs * ctx["epoch"]
    if epochs == 1 and (found := baseline_decoder(ctx["baseline"], ctx["settings"], kind, steps)):
        return found
    name = f"{kind}-e{epochs}"
    times_path = ctx["out"] / "runs" / name / "train_seconds.json"  # one file per run: runs may go in parallel
    budget, (dt, dv), (tt, tv) = ctx["budget"], ctx["corpora"], ctx["targets"]
    trained_before = done(ctx["out"] / "models" / name)
    clock = StageClock()
    with clock(name):
        if kind == "memdec":
            beta, targets = ctx["settings"]["beta"], (tt, tv)
        else:
            beta, targets = 0.0, None
        lr = budget.decoder_lr
        model = train_model(name, ctx["out"], dt, dv, budget, steps, ctx["start"], beta, targets, lr=lr)
    if not trained_before:  # a rerun reuses the finished model: keep the time of the run that trained it
        write_json_atomic(times_path, {"seconds": clock.seconds[name], "cpu_seconds": clock.cpu_seconds[name]})
    unknown = {"seconds": None, "cpu_seconds": None}  # trained by a run that recorded no time
    return model, json.loads(times_path.read_text()) if times_path.is_file() else unknown


def valid_scores(models: dict[str, Path | str], ctx: dict) -> dict[str, np.ndarray]:
    """Sliding-window gold log-probs of every model on the baseline's domain valid split (cached under out)."""
    dv = ctx["corpora"][1]
    return {
        name: gold_log_probs(ref, dv, ctx["budget"], ctx["out"] / "scores" / f"{name}-domain-valid.npy")
        for name, ref in models.items()
    }


def mixtures(base: np.ndarray, decoders: dict[str, np.ndarray]) -> dict[str, tuple[float, np.ndarray]]:
    """Per decoder: its valid-best λ with this base and the mixture's per-position gold log-probs at that λ."""
    out = {}
    for name, lp in decoders.items():
        lam = sweep_lambda(base, lp, DEFAULT_LAMBDA_GRID)[0]
        as_f64 = [torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (base, lp)]
        out[name] = (lam, mix_log_probs(*as_f64, lam).numpy())
    return out


def table(title: str, rows: dict[str, np.ndarray], lambdas: dict[str, float], ctx: dict) -> list[str]:
    """One perplexity table: each row's valid perplexity and 95 % interval, the paired difference from the best E
    of the same decoder, and MemDec − CE-only at the same E (all from the same bootstrap draws)."""
    keys = list(rows)
    draws = bootstrap_perplexities([document_sums(rows[k], ctx["offsets"]) for k in keys])
    ppl = {k: perplexity(rows[k]) for k in keys}
    lines = [f"## {title}", "| decoder | E | steps | λ | valid ppl [95 % CI] | − best E of this decoder [95 % CI] | "
             "MemDec − CE-only [95 % CI] |", "|---|---:|---:|---:|---|---|---|"]  # fmt: skip
    for k in keys:
        kind, epochs = k.rsplit("-e", 1)
        best = min((j for j in keys if j.rsplit("-e", 1)[0] == kind), key=ppl.get)
        vs_best = f"{ppl[k] - ppl[best]:+.2f} {fmt(interval(draws[keys.index(k)] - draws[keys.index(best)]))}"
        ce = f"ce-only-e{epochs}"
        vs_ce = "—"
        if kind == "memdec" and ce in rows:
            vs_ce = f"{ppl[k] - ppl[ce]:+.2f} {fmt(interval(draws[keys.index(k)] - draws[keys.index(ce)]))}"
        lam = "—" if k not in lambdas else f"{lambdas[k]:.2f}" + (" (edge)" if lambda_at_edge(lambdas[k]) else "")
        steps = int(epochs) * ctx["epoch"]
        lines.append(f"| {kind} | {epochs} | {steps} | {lam} | {ppl[k]:.2f} {fmt(interval(draws[keys.index(k)]))} | "
                     f"{vs_best} | {vs_ce} |")  # fmt: skip
    return lines + [""]


def fmt(bounds: list[float]) -> str:
    return f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"


def time_lines(times: dict[str, dict], baseline: Path, ctx: dict) -> list[str]:
    """Training time of every decoder, and the baseline quickstart's total projected to each E (CPU seconds: the
    baseline's total plus what both decoders' training adds over one epoch)."""
    lines = ["## training time (as its run recorded it; on a shared machine wall seconds are inflated)",
             "| decoder | E | steps | wall s | CPU s |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for k, t in times.items():
        kind, epochs = k.rsplit("-e", 1)
        lines.append(f"| {kind} | {epochs} | {int(epochs) * ctx['epoch']} | {t['seconds']} | {t['cpu_seconds']} |")
    report = baseline / "report.json"
    if not report.is_file():
        return lines + ["", "(no baseline report.json yet: no projection of the quickstart's total)", ""]
    run = json.loads(report.read_text())["run"]
    if not all(run["cpu_seconds"].values()):  # a stage the baseline reused (0 s): its total is not a whole run's
        return lines + ["", "(the baseline reused stages from an earlier run, so its total is not a whole run's: "
                        "no projection of the quickstart's total)", ""]  # fmt: skip
    total = run["total_cpu_seconds"]
    lines += ["", f"baseline quickstart total CPU s: {total} (CPU s / 2: a lower bound of the wall clock on 2 "
              "unloaded cores)", "| E | projected quickstart CPU s | CPU min / 2 |", "|---:|---:|---:|"]  # fmt: skip
    epochs = sorted({int(k.rsplit("-e", 1)[1]) for k in times})
    for e in epochs:
        cpu = {d: (times.get(f"{d}-e{e}", {}).get("cpu_seconds"), times.get(f"{d}-e1", {}).get("cpu_seconds"))
               for d in ctx["decoders"]}  # fmt: skip
        if any(None in pair for pair in cpu.values()):
            continue  # a time not recorded: no projection for this E
        extra = sum(now - one for now, one in cpu.values())
        lines.append(f"| {e} | {total + extra:.0f} | {(total + extra) / 2 / 60:.1f} |")
    return lines + [""]


def main(
    baseline: Path,
    out: Path,
    epochs: list[int] = [1, 2, 3, 4],  # noqa: B006 (jsonargparse needs the literal default)
    decoders: list[str] = list(DECODERS),  # noqa: B006
) -> None:
    """Train (or reuse) every decoder at every E, score them on valid, print the tables."""
    if unknown := sorted(set(decoders) - set(DECODERS)):
        raise ValueError(f"--decoders {unknown}: each must be one of {list(DECODERS)}.")
    settings, budget = baseline_run(baseline)
    c, bases = baseline / "corpora", bases_of(settings, baseline)
    dv = c / "domain-valid"
    tokens = np.asarray(Corpus(dv).tokens)
    ctx = {
        "baseline": baseline, "out": out, "settings": settings, "budget": budget, "decoders": decoders,
        "corpora": (c / "domain-train", dv), "targets": (baseline / "targets/train", baseline / "targets/valid"),
        "epoch": epoch_steps(c / "domain-train", budget),
        "start": min(bases.values(), key=parameters),
        "offsets": split_document_offsets(dv, tokens, Corpus(dv).tokenizer["eos_token_id"]),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    trained = {f"{d}-e{e}": trained_decoder(d, e, ctx) for e in epochs for d in decoders}
    scores = valid_scores({k: m for k, (m, _) in trained.items()} | bases, ctx)
    print(f"baseline: {baseline}\ndecoder start: {ctx['start']}\none epoch: {ctx['epoch']} steps of "
          f"{budget.batch_size} x {budget.window} tokens ({Corpus(c / 'domain-train').num_tokens} train tokens)\n"
          f"valid: {dv} ({len(tokens)} tokens, {len(ctx['offsets']) - 1} documents)\nlr {budget.decoder_lr}, "
          f"beta {settings['beta']}, λ grid {list(DEFAULT_LAMBDA_GRID)}\n")  # fmt: skip
    alone = {k: scores[k] for k in trained}
    print("\n".join(table("decoder alone, domain valid", alone, {}, ctx)))
    for name in bases:
        mixed = mixtures(scores[name], alone)
        rows, lambdas = {k: lp for k, (_, lp) in mixed.items()}, {k: lam for k, (lam, _) in mixed.items()}
        print("\n".join(table(f"{name} + decoder at its valid-best λ, domain valid (base alone: "
                              f"{perplexity(scores[name]):.2f})", rows, lambdas, ctx)))  # fmt: skip
    print("\n".join(time_lines({k: t for k, (_, t) in trained.items()}, baseline, ctx)))


if __name__ == "__main__":
    CLI(main, as_positional=False)
