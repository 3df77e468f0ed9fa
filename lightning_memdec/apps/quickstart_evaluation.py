"""The quickstart's evaluation: every model's per-position log p(gold) on the domain valid and test splits, turned
into ``memdec evaluate``'s rows, λ curves, bootstrap intervals and overlap audit (one report schema, one writer).

The quickstart scores its own tokenized corpora (cached ``.npy`` arrays, reused when rerun) instead of going through
``evaluate``'s scorer: one pass per model and split gives the gold log-probs and the kNN-LM's query keys, searched in
the train datastores it built anyway; from the arrays on, every
figure comes from the same functions as ``evaluate``'s (:mod:`evaluation.report_rows`, :mod:`evaluation.row_figures`,
:mod:`evaluation.knn_temperature`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_memdec.apps.quickstart_stages import Budget, StageClock, gold_log_probs, knn_log_probs, scores_and_keys
from lightning_memdec.evaluation.knn_temperature import settle_temperature
from lightning_memdec.evaluation.overlap import NGRAM, split_document_offsets
from lightning_memdec.evaluation.report_rows import lambda_curve, report_row
from lightning_memdec.evaluation.row_figures import audit_splits, general_figures, overlap_report, row_figures
from lightning_memdec.io.embedded import EMBEDDED_PREFIX, load_tokenizer
from lightning_memdec.io.token_corpus import Corpus
from lightning_memdec.kernels.scoring import DEFAULT_LAMBDA_GRID, DEFAULT_TEMPERATURE_GRID

__all__ = ["SPLITS", "GENERAL_TEST", "evaluate_all", "overlap_audits", "general_report"]

SPLITS = ("valid", "test")  # the domain splits: λ and T are chosen on valid, every reported figure is on test
GENERAL_TEST = f"{EMBEDDED_PREFIX}general/test"


def evaluate_all(
    out: Path,
    bases: dict[str, str],
    teacher: dict[str, str],
    corpora: dict[str, Path],
    decoders: dict[str, Path],
    budget: Budget,
    clock: StageClock | None = None,
) -> dict[str, Any]:
    """Each base alone / + kNN-LM (own datastore) / + each decoder, the teacher alone / + kNN-LM, and the general
    test split, as ``memdec evaluate``'s report: λ and every kNN temperature chosen on valid, figures on test.

    ``decoders`` maps ``memdec`` (and ``ce_only``) to the trained decoders; ``teacher`` is ``{name: model}``.
    """
    clock = clock or StageClock()
    grid, temperatures = list(DEFAULT_LAMBDA_GRID), list(DEFAULT_TEMPERATURE_GRID)
    scores = out / "scores"

    def gold(model, split: str, name: str) -> np.ndarray:
        with clock("score models"):
            return gold_log_probs(model, corpora[split], budget, scores / f"{name}-{split}.npy")

    decoded = {
        key: {s: gold(ref, f"domain-{s}", key.replace("_", "-")) for s in SPLITS} for key, ref in decoders.items()
    }
    audits = overlap_audits(corpora)
    models = [(name, ref, "base") for name, ref in bases.items()] + [(n, r, "teacher") for n, r in teacher.items()]
    rows, curves = [], {}
    for name, ref, role in models:
        with clock("score models"):  # each split's kNN-LM queries are captured in the same pass
            scored = {s: scores_and_keys(ref, corpora[f"domain-{s}"], budget, scores / f"{name}-domain-{s}.npy",
                                         keys=True) for s in SPLITS}  # fmt: skip
        lp = {s: {"base": scored[s][0]} for s in SPLITS}
        with clock("kNN-LM datastores + search"):
            knn = knn_log_probs(ref, name, out, corpora, budget, temperatures, {s: scored[s][1] for s in SPLITS})
        for s in SPLITS:
            lp[s] |= knn[s] | ({key: arrays[s] for key, arrays in decoded.items()} if role == "base" else {})
        choice = settle_temperature(lp, temperatures, grid, None)
        rows.append(report_row(name, ref, role, lp, None, None, grid) | choice)
        rows[-1] |= row_figures(rows[-1], lp["test"], audits)
        curves[name] = lambda_curve(lp, grid)
    general = general_report([r for r in rows if r["role"] == "base"], bases, decoders["memdec"], corpora, gold)
    stores = out / "stores"
    return {
        "bases": list(bases.values()), "teacher": next(iter(teacher.values())),
        "memdec": str(decoders["memdec"]), "ce_only": str(decoders["ce_only"]) if "ce_only" in decoders else None,
        "test": str(corpora["domain-test"]), "valid": str(corpora["domain-valid"]),
        "datastores": {name: str(stores / f"{name}-train") for name, _, _ in models},
        "k": budget.k, "k_asked": budget.k, "temperature": None, "temperature_grid": temperatures,
        "window": budget.window, "stride": budget.stride, "max_tokens": None,
        "positions": {s: Corpus(corpora[f"domain-{s}"]).num_positions for s in ("test", "valid")},
        "lambda_grid": grid, "rows": rows, "curves": curves, "latency": None,
        "overlap": overlap_report({"domain": audits}, [str(corpora["domain-train"])]), "general": general,
    }  # fmt: skip


def overlap_audits(corpora: dict[str, Path]) -> dict[str, tuple]:
    """The overlap audit of the domain valid and test splits against the domain train text, which feeds the teacher,
    every datastore, the targets and both decoders (``{split: (document offsets, audit)}``, as evaluate's)."""
    train = Corpus(corpora["domain-train"])
    tokenizer = load_tokenizer(train.tokenizer["name"])
    splits = {s: (corpora[f"domain-{s}"], np.asarray(Corpus(corpora[f"domain-{s}"]).tokens)) for s in SPLITS}
    return audit_splits(splits, [np.asarray(train.tokens)], tokenizer, NGRAM, [str(corpora["domain-train"])])


def general_report(rows: list[dict], bases: dict[str, str], memdec: Path, corpora: dict[str, Path], gold) -> dict:
    """Each base alone and + MemDec (at its domain λ) on the general test split, with intervals over documents."""
    split = "general-test"
    corpus = Corpus(corpora[split])
    tokens = np.asarray(corpus.tokens)
    offsets = split_document_offsets(corpora[split], tokens, int(corpus.tokenizer["eos_token_id"]))
    mem = gold(memdec, split, "memdec")
    figures = [
        general_figures(r, {"base": gold(bases[r["base"]], split, r["base"]), "memdec": mem}, offsets) for r in rows
    ]
    return {"test": GENERAL_TEST, "positions": corpus.num_positions, "rows": figures}
